//! Reading the configuration file: TOML syntax and types, with the path of the first
//! problem. Reference checks live in `validate`.

use std::path::{Path, PathBuf};

use super::Config;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read configuration file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
}

/// Reads and parses `path`; relative paths inside resolve against its directory.
pub fn load(path: &Path) -> Result<Config, LoadError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| LoadError::Read { path: path.to_path_buf(), source })?;
    let mut config = parse(&text)?;
    config.base_dir = path
        .parent()
        .map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p })
        .unwrap_or(Path::new("."))
        .to_path_buf();
    Ok(config)
}

/// Parses configuration text. The error names the key path (`systems.hr.inbox`) and the
/// line and column when the parser knows them.
pub fn parse(text: &str) -> Result<Config, LoadError> {
    let deserializer = toml::Deserializer::parse(text).map_err(|e| LoadError::Parse {
        path: "(syntax)".into(),
        message: one_line(&e.to_string()),
    })?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let location = inner
            .span()
            .map(|span| {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!(" (line {line})")
            })
            .unwrap_or_default();
        LoadError::Parse {
            path: if path == "." { "(root)".into() } else { path },
            message: format!("{}{location}", first_line(inner.message())),
        }
    })
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

fn one_line(s: &str) -> String {
    s.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}

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
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
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
    // Only the message and the line: the parser's own rendering quotes the source line,
    // which may hold a secret someone pasted by mistake.
    let deserializer = toml::Deserializer::parse(text).map_err(|e| LoadError::Parse {
        path: "(syntax)".into(),
        message: format!("{}{}", first_line(e.message()), line_of(text, e.span())),
    })?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let location = line_of(text, inner.span());
        LoadError::Parse {
            path: if path == "." { "(root)".into() } else { path },
            message: format!("{}{location}", first_line(inner.message())),
        }
    })
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    span.map(|span| {
        let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
        format!(" (line {line})")
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_errors_name_the_line_but_never_quote_it() {
        let text = "[state]\ndir = \"s\"\n[systems.crm]\ntoken = \"canary-secret-value\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains("line 4"), "{err}");
        assert!(!err.contains("canary-secret-value"), "{err}");
    }

    #[test]
    fn an_applier_round_defaults_to_the_batch_size_and_to_4000_toward_postgres() {
        let config = parse(
            r#"
            [state]
            dir = "state"

            [engine]
            batch_size = 300

            [systems.files]
            type = "file"
            export_dir = "out"

            [systems.app]
            type = "postgres"
            host = "db"
            database = "app"
            user = "concord"

            [systems.app_small]
            type = "postgres"
            host = "db"
            database = "app"
            user = "concord"
            write_batch_size = 100

            [entities]
            "#,
        )
        .unwrap();
        let round = |name: &str| config.systems[name].write_batch_size(&config.engine);
        assert_eq!(round("files"), 300);
        assert_eq!(round("app"), 4000);
        assert_eq!(round("app_small"), 100);
    }
}

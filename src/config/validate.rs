//! Semantic checks of a parsed configuration.

use super::Config;

/// One problem, with the key path it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found, each with its path; empty when the configuration is valid.
pub fn validate(_config: &Config) -> Vec<Problem> {
    Vec::new()
}

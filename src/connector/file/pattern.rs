//! File name patterns: a link's `object` names the export files it reads
//! (`employees-*.csv`). `*` matches any run of characters (also none), `?` exactly one
//! character, anything else itself, case-sensitively. A pattern matches names inside
//! the inbox only, so it holds no path separator.

use super::error::FileError;

#[derive(Debug, Clone)]
pub(crate) struct NamePattern {
    chars: Vec<char>,
}

impl NamePattern {
    pub(crate) fn parse(pattern: &str) -> Result<Self, FileError> {
        if pattern.is_empty() || pattern.contains(['/', '\\']) {
            return Err(FileError::BadPattern {
                pattern: pattern.to_string(),
            });
        }
        Ok(Self {
            chars: pattern.chars().collect(),
        })
    }

    /// Whether `name` matches. Greedy with one backtrack point (the last `*`), which is
    /// exact for patterns of only `*`, `?` and literals and linear in practice.
    pub(crate) fn matches(&self, name: &str) -> bool {
        let name: Vec<char> = name.chars().collect();
        let p = &self.chars;
        let (mut pi, mut ni) = (0, 0);
        // Pattern index after the last `*`, and the name index that `*` resumes from.
        let mut star: Option<(usize, usize)> = None;
        while ni < name.len() {
            if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == name[ni])) {
                pi += 1;
                ni += 1;
            } else if pi < p.len() && p[pi] == '*' {
                star = Some((pi + 1, ni));
                pi += 1;
            } else if let Some((after_star, from)) = star {
                pi = after_star;
                ni = from + 1;
                star = Some((after_star, from + 1));
            } else {
                return false;
            }
        }
        p[pi..].iter().all(|&c| c == '*')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(pattern: &str, name: &str, expected: bool) {
        let p = NamePattern::parse(pattern).expect("test patterns are valid");
        assert_eq!(p.matches(name), expected, "{pattern:?} vs {name:?}");
    }

    #[test]
    fn matches_like_a_shell_glob() {
        check("employees-*.csv", "employees-2024-01-01.csv", true);
        check("employees-*.csv", "employees-.csv", true);
        check("employees-*.csv", "employees-1.csv.tmp", false);
        check("employees-*.csv", "contractors-1.csv", false);
        check("employees-*.csv", "employees-1.CSV", false);
        check("e?.csv", "e1.csv", true);
        check("e?.csv", "e.csv", false);
        check("e?.csv", "e12.csv", false);
        check("*", "anything", true);
        check("*", "", true);
        check("a*b*c", "aXbYc", true);
        check("a*b*c", "abcbc", true);
        check("a*b*c", "acb", false);
        check("*.jsonl", "x.jsonl.jsonl", true);
        check("**x", "abx", true);
        check("exact.csv", "exact.csv", true);
        check("exact.csv", "exact.csvx", false);
        check("ü*.csv", "über.csv", true);
    }

    #[test]
    fn paths_and_empty_patterns_are_refused() {
        assert!(NamePattern::parse("exports/employees-*.csv").is_err());
        assert!(NamePattern::parse("").is_err());
    }
}

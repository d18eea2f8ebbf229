//! A simulated HR platform: it keeps its employee list and drops nightly-style CSV
//! exports into an inbox folder, as HR platforms do over SFTP.
//!
//! Files are named `employees-<date>-<seq>.csv` with the header
//! `employee_id,first,last,email,job_title`, and each holds every current employee.
//! A file is written under a temporary name (a leading `.` and a `.tmp` suffix, which
//! readers skip) and renamed into place, so a reader never sees half a file.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One employee as the HR platform exports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Employee {
    pub employee_id: String,
    pub first: String,
    pub last: String,
    pub email: String,
    pub job_title: String,
}

/// The HR platform's employee list and its export folder.
#[derive(Debug)]
pub struct HrExport {
    inbox: PathBuf,
    employees: BTreeMap<String, Employee>,
    /// Exports written so far; numbers the next file.
    seq: u32,
}

/// The CSV header of every export.
pub const HEADER: [&str; 5] = ["employee_id", "first", "last", "email", "job_title"];

impl HrExport {
    /// An HR platform that exports into `inbox` (created if missing).
    pub fn new(inbox: impl Into<PathBuf>) -> std::io::Result<HrExport> {
        let inbox = inbox.into();
        std::fs::create_dir_all(&inbox)?;
        Ok(HrExport {
            inbox,
            employees: BTreeMap::new(),
            seq: 0,
        })
    }

    pub fn inbox(&self) -> &Path {
        &self.inbox
    }

    /// Hires or changes an employee (keyed by `employee_id`).
    pub fn upsert(&mut self, employee: Employee) {
        self.employees.insert(employee.employee_id.clone(), employee);
    }

    /// Changes one employee's job title; false when there is no such employee.
    pub fn set_title(&mut self, employee_id: &str, title: &str) -> bool {
        match self.employees.get_mut(employee_id) {
            Some(e) => {
                e.job_title = title.to_string();
                true
            }
            None => false,
        }
    }

    pub fn employees(&self) -> impl Iterator<Item = &Employee> {
        self.employees.values()
    }

    pub fn employee(&self, employee_id: &str) -> Option<&Employee> {
        self.employees.get(employee_id)
    }

    /// Writes a full export atomically and returns its path.
    pub fn export(&mut self) -> std::io::Result<PathBuf> {
        self.seq += 1;
        let date = chrono::Utc::now().format("%Y-%m-%d");
        let name = format!("employees-{date}-{:04}.csv", self.seq);
        let temp = self.inbox.join(format!(".{name}.tmp"));
        let target = self.inbox.join(&name);
        let mut writer = csv::Writer::from_writer(Vec::new());
        let row = |e: &Employee| {
            [
                e.employee_id.clone(),
                e.first.clone(),
                e.last.clone(),
                e.email.clone(),
                e.job_title.clone(),
            ]
        };
        writer.write_record(HEADER).map_err(std::io::Error::other)?;
        for employee in self.employees.values() {
            writer.write_record(row(employee)).map_err(std::io::Error::other)?;
        }
        let bytes = writer.into_inner().map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&temp, &target)?;
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_are_complete_files_under_the_final_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut hr = HrExport::new(dir.path().join("inbox")).expect("inbox");
        hr.upsert(Employee {
            employee_id: "E1".into(),
            first: "Ada".into(),
            last: "Lovelace".into(),
            email: "ada@example.com".into(),
            job_title: "Analyst, Engines".into(),
        });
        let first = hr.export().expect("export");
        assert!(hr.set_title("E1", "Director"));
        assert!(!hr.set_title("E9", "Director"));
        let second = hr.export().expect("export");
        assert_ne!(first, second);
        let names: Vec<String> = std::fs::read_dir(hr.inbox())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
        assert!(names.iter().all(|n| n.starts_with("employees-") && n.ends_with(".csv")));
        let text = std::fs::read_to_string(&second).expect("read");
        assert_eq!(
            text,
            "employee_id,first,last,email,job_title\nE1,Ada,Lovelace,ada@example.com,Director\n"
        );
        let text = std::fs::read_to_string(&first).expect("read");
        assert!(text.contains("\"Analyst, Engines\""), "{text}");
    }
}

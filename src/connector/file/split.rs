//! Streaming passes over an export file that never hold more than one bounded record:
//! the UTF-8 check that runs before anything of a file is yielded, and the splitter
//! that cuts the file into records with their byte offsets and line numbers.
//!
//! The splitter finds record boundaries itself instead of letting the csv crate read
//! the stream, for three reasons: a record longer than `max_record_bytes` must be
//! skipped without being buffered (the csv crate grows its buffer to any record's
//! size), the checkpoint needs the exact byte offset after each record, and reject
//! locations need the line a record starts on. Each bounded record is then parsed by
//! the csv crate, so field semantics (quotes, escapes) stay the crate's.
//!
//! CSV framing follows the csv crate's default dialect (RFC 4180): `,` separates
//! fields, a field that starts with `"` is quoted until a `"` not followed by another
//! `"`, line terminators inside a quoted field are data, and `\n`, `\r\n` or a lone
//! `\r` ends a record. JSONL framing ends a record at `\n` only and drops a `\r`
//! before it. A UTF-8 byte order mark at the start of a file is skipped.

use std::io::{self, BufRead, Read};

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Size of the read buffer of the UTF-8 check.
const UTF8_CHUNK: usize = 64 * 1024;

/// The byte offset of the first invalid UTF-8 sequence in `reader`, if any. A sequence
/// cut off by the end of the input is invalid at its first byte.
pub(crate) fn find_invalid_utf8(reader: impl Read) -> io::Result<Option<u64>> {
    find_invalid_utf8_chunked(reader, UTF8_CHUNK)
}

fn find_invalid_utf8_chunked(mut reader: impl Read, chunk: usize) -> io::Result<Option<u64>> {
    // A UTF-8 sequence is at most 4 bytes, so at most 3 are carried into the next read.
    let mut buf = vec![0u8; chunk.max(4)];
    let mut carry = 0usize;
    // File offset of buf[0].
    let mut base = 0u64;
    loop {
        let n = match reader.read(&mut buf[carry..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok((carry > 0).then_some(base));
        }
        let filled = carry + n;
        match std::str::from_utf8(&buf[..filled]) {
            Ok(_) => {
                base += filled as u64;
                carry = 0;
            }
            Err(e) if e.error_len().is_some() => return Ok(Some(base + e.valid_up_to() as u64)),
            Err(e) => {
                let valid = e.valid_up_to();
                buf.copy_within(valid..filled, 0);
                carry = filled - valid;
                base += valid as u64;
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    Csv,
    Lines,
}

/// One record as cut from the file, before parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawRecord {
    /// The record without its terminator, cut at `max` bytes when oversized.
    pub bytes: Vec<u8>,
    /// The record was longer than `max` bytes; `bytes` holds its start only.
    pub oversized: bool,
    /// The file ended inside a quoted field.
    pub unterminated_quote: bool,
    /// Line the record starts on, from 1.
    pub start_line: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CsvState {
    FieldStart,
    Unquoted,
    Quoted,
    QuoteInQuoted,
}

/// Cuts records from a buffered reader positioned at `offset` / after line `line`.
pub(crate) struct RecordReader<R> {
    inner: R,
    framing: Framing,
    max: usize,
    /// File offset of the next unread byte.
    offset: u64,
    /// Line terminators consumed so far (outside and inside quoted fields).
    line: u64,
}

impl<R: BufRead> RecordReader<R> {
    pub(crate) fn new(inner: R, framing: Framing, max: usize, offset: u64, line: u64) -> Self {
        Self {
            inner,
            framing,
            max,
            offset,
            line,
        }
    }

    /// File offset and line count after the last record returned.
    pub(crate) fn position(&self) -> (u64, u64) {
        (self.offset, self.line)
    }

    /// Whether nothing is left to read.
    pub(crate) fn at_eof(&mut self) -> io::Result<bool> {
        Ok(self.inner.fill_buf()?.is_empty())
    }

    /// The next record, `None` at the end of the input. A blank line is a record with
    /// no bytes; callers skip it.
    pub(crate) fn next_record(&mut self) -> io::Result<Option<RawRecord>> {
        if self.offset == 0 {
            let buf = self.inner.fill_buf()?;
            if buf.starts_with(BOM) {
                self.inner.consume(BOM.len());
                self.offset += BOM.len() as u64;
            }
        }
        let mut record = RawRecord {
            bytes: Vec::new(),
            oversized: false,
            unterminated_quote: false,
            start_line: self.line + 1,
        };
        let mut state = CsvState::FieldStart;
        let mut started = false;
        loop {
            let buf = self.inner.fill_buf()?;
            if buf.is_empty() {
                if !started {
                    return Ok(None);
                }
                record.unterminated_quote = state == CsvState::Quoted;
                return Ok(Some(self.finish(record)));
            }
            started = true;
            // Bytes of `buf` that belong to this record, and the terminator if found.
            let (used, terminator) = match self.framing {
                Framing::Lines => match buf.iter().position(|&b| b == b'\n') {
                    Some(i) => (i, Some(b'\n')),
                    None => (buf.len(), None),
                },
                Framing::Csv => {
                    let mut end = (buf.len(), None);
                    for (i, &b) in buf.iter().enumerate() {
                        state = match (state, b) {
                            (CsvState::Quoted, b'"') => CsvState::QuoteInQuoted,
                            (CsvState::Quoted, b'\n') => {
                                self.line += 1;
                                CsvState::Quoted
                            }
                            (CsvState::Quoted, _) => CsvState::Quoted,
                            (_, b'\n' | b'\r') => {
                                end = (i, Some(b));
                                break;
                            }
                            (CsvState::FieldStart, b'"') => CsvState::Quoted,
                            (CsvState::QuoteInQuoted, b'"') => CsvState::Quoted,
                            (_, b',') => CsvState::FieldStart,
                            _ => CsvState::Unquoted,
                        };
                    }
                    end
                }
            };
            let room = self.max.saturating_sub(record.bytes.len());
            record.bytes.extend_from_slice(&buf[..used.min(room)]);
            record.oversized |= used > room;
            let consumed = used + usize::from(terminator.is_some());
            self.inner.consume(consumed);
            self.offset += consumed as u64;
            if let Some(t) = terminator {
                self.line += 1;
                if t == b'\r' && self.inner.fill_buf()?.first() == Some(&b'\n') {
                    self.inner.consume(1);
                    self.offset += 1;
                }
                return Ok(Some(self.finish(record)));
            }
        }
    }

    fn finish(&self, mut record: RawRecord) -> RawRecord {
        if self.framing == Framing::Lines && !record.oversized && record.bytes.last() == Some(&b'\r') {
            record.bytes.pop();
        }
        record
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(input: &[u8], framing: Framing, max: usize) -> Vec<(String, bool, u64, (u64, u64))> {
        // A tiny buffer so records straddle reads.
        let reader = io::BufReader::with_capacity(3, input);
        let mut r = RecordReader::new(reader, framing, max, 0, 0);
        let mut out = Vec::new();
        while let Some(rec) = r.next_record().expect("reading a slice does not fail") {
            let text = String::from_utf8(rec.bytes).expect("test input is utf-8");
            out.push((text, rec.oversized, rec.start_line, r.position()));
        }
        out
    }

    #[test]
    fn csv_records_with_quotes_crlf_and_blank_lines() {
        let input = b"\xEF\xBB\xBFid,name\r\n1,\"a, \"\"b\"\"\r\nc\"\r\n\r\n2,x\r3,y";
        let got = cut(input, Framing::Csv, 100);
        assert_eq!(
            got,
            vec![
                ("id,name".into(), false, 1, (12, 1)),
                ("1,\"a, \"\"b\"\"\r\nc\"".into(), false, 2, (29, 3)),
                (String::new(), false, 4, (31, 4)),
                ("2,x".into(), false, 5, (35, 5)),
                ("3,y".into(), false, 6, (38, 5)),
            ]
        );
    }

    #[test]
    fn oversized_records_are_skipped_whole() {
        let got = cut(b"ab,\"c\nd\"ef\ngh\n", Framing::Csv, 4);
        assert_eq!(got[0].0, "ab,\"");
        assert!(got[0].1);
        assert_eq!(got[1], ("gh".into(), false, 3, (14, 3)));
    }

    #[test]
    fn a_quote_inside_an_unquoted_field_is_data() {
        let got = cut(b"a\"b,c\nd\n", Framing::Csv, 100);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "a\"b,c");
    }

    #[test]
    fn unterminated_quote_runs_to_the_end() {
        let reader = io::BufReader::new(&b"1,\"open\n2,x\n"[..]);
        let mut r = RecordReader::new(reader, Framing::Csv, 100, 0, 0);
        let rec = r.next_record().unwrap().unwrap();
        assert!(rec.unterminated_quote);
        assert!(r.next_record().unwrap().is_none());
    }

    #[test]
    fn lines_ignore_quotes_and_drop_cr() {
        let got = cut(b"{\"a\":\"\n\"}\r\n\nlast", Framing::Lines, 100);
        let texts: Vec<&str> = got.iter().map(|g| g.0.as_str()).collect();
        assert_eq!(texts, vec!["{\"a\":\"", "\"}", "", "last"]);
        assert_eq!(got[3].2, 4);
    }

    #[test]
    fn resumes_from_an_offset_with_line_numbers() {
        let input = b"h\n1\n2\n3\n";
        let mut r = RecordReader::new(io::BufReader::new(&input[4..]), Framing::Csv, 100, 4, 2);
        let rec = r.next_record().unwrap().unwrap();
        assert_eq!((rec.bytes.as_slice(), rec.start_line), (&b"2"[..], 3));
        assert_eq!(r.position(), (6, 3));
    }

    #[test]
    fn invalid_utf8_offset_across_chunk_boundaries() {
        let mut input = "héllo wörld ".repeat(20).into_bytes();
        assert_eq!(find_invalid_utf8_chunked(&input[..], 5).unwrap(), None);
        let bad_at = input.len();
        input.extend_from_slice(b"ok\xFFmore");
        assert_eq!(
            find_invalid_utf8_chunked(&input[..], 5).unwrap(),
            Some(bad_at as u64 + 2)
        );
        assert_eq!(find_invalid_utf8(&input[..]).unwrap(), Some(bad_at as u64 + 2));
        // A sequence cut off by the end of the file.
        assert_eq!(find_invalid_utf8_chunked(&b"ab\xC3"[..], 2).unwrap(), Some(2));
    }
}

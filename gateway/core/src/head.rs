//! Where an HTTP/1 request head ends, judged on the raw bytes as they arrive and before any
//! parser sees them: a head too large is refused in the contract's shape (431) whatever the
//! HTTP parser's own limits, and a head that never ends can be held to a deadline.

/// Header lines a head may carry. Pingora's parser refuses more than 256 with a bare 400;
/// the gateway refuses them first, with 431.
pub const MAX_HEADER_LINES: usize = 256;

/// What the bytes received so far make of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadScan {
    /// The head ends after this many bytes (its empty line included); what follows is body.
    Complete(usize),
    /// No end yet, and within the limits.
    Incomplete,
    /// Over the byte limit, or more than [`MAX_HEADER_LINES`] header lines.
    TooLarge,
}

/// Scans a growing buffer for the end of a head, carrying on where the last call stopped, so
/// a head that arrives a byte at a time is still read in linear time.
#[derive(Debug, Default)]
pub struct HeadScanner {
    /// The first byte not yet judged.
    next: usize,
    /// Lines ended so far: the request line, then the header lines.
    lines: usize,
    /// Whether the request line has begun (empty lines before it are allowed, RFC 9112 §2.2).
    started: bool,
}

impl HeadScanner {
    /// Judges `buf` (every byte received for this head, first to last) against `max_bytes`.
    /// A line ends in LF, with or without CR before it; the head ends at the first empty line.
    pub fn scan(&mut self, buf: &[u8], max_bytes: usize) -> HeadScan {
        while self.next < buf.len() {
            let byte = buf[self.next];
            if !self.started {
                if byte == b'\r' || byte == b'\n' {
                    self.next += 1;
                    continue;
                }
                self.started = true;
            }
            if byte == b'\n' {
                let end = match (buf.get(self.next + 1), buf.get(self.next + 2)) {
                    (Some(b'\n'), _) => Some(self.next + 2),
                    (Some(b'\r'), Some(b'\n')) => Some(self.next + 3),
                    // Cannot tell yet: look at this LF again when more bytes are here.
                    (None, _) | (Some(b'\r'), None) => break,
                    _ => None,
                };
                if let Some(end) = end {
                    return if end > max_bytes {
                        HeadScan::TooLarge
                    } else {
                        HeadScan::Complete(end)
                    };
                }
                self.lines += 1;
                // The request line and every header line but the last have ended here.
                if self.lines > MAX_HEADER_LINES {
                    return HeadScan::TooLarge;
                }
            }
            self.next += 1;
        }
        if buf.len() > max_bytes {
            HeadScan::TooLarge
        } else {
            HeadScan::Incomplete
        }
    }
}

/// Whether a raw head names both `Content-Length` and `Transfer-Encoding`, as sent (a parser
/// may drop one of them before anyone else sees the head).
pub fn names_both_framings(raw_head: &[u8]) -> bool {
    let names = raw_head
        .split(|b| *b == b'\n')
        .skip(1)
        .filter_map(|line| line.iter().position(|b| *b == b':').map(|at| &line[..at]));
    let (mut length, mut coding) = (false, false);
    for name in names {
        length |= name.eq_ignore_ascii_case(b"content-length");
        coding |= name.eq_ignore_ascii_case(b"transfer-encoding");
    }
    length && coding
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_whole(buf: &[u8], max: usize) -> HeadScan {
        HeadScanner::default().scan(buf, max)
    }

    /// The same bytes fed one at a time, as a slow client sends them.
    fn scan_bytewise(buf: &[u8], max: usize) -> HeadScan {
        let mut scanner = HeadScanner::default();
        let mut last = HeadScan::Incomplete;
        for end in 1..=buf.len() {
            last = scanner.scan(&buf[..end], max);
            if last != HeadScan::Incomplete {
                return last;
            }
        }
        last
    }

    #[test]
    fn both_framings_are_seen_in_any_order_and_case() {
        assert!(names_both_framings(
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\nContent-Length: 3\r\n\r\n"
        ));
        assert!(!names_both_framings(
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nX-Transfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(!names_both_framings(
            b"POST /Content-Length: HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
    }

    #[test]
    fn heads_end_at_the_first_empty_line() {
        let cases: &[(&[u8], HeadScan)] = &[
            (
                b"POST / HTTP/1.1\r\nHost: a\r\n\r\n{}",
                HeadScan::Complete(28),
            ),
            (b"POST / HTTP/1.1\nHost: a\n\n{}", HeadScan::Complete(25)),
            (b"POST / HTTP/1.1\r\nHost: a\n\r\n", HeadScan::Complete(27)),
            (b"\r\n\r\nGET / HTTP/1.1\r\n\r\n", HeadScan::Complete(22)),
            (b"POST / HTTP/1.1\r\nHost: a\r\n", HeadScan::Incomplete),
            (b"POST / HTTP/1.1\r\nHost: a\r\n\r", HeadScan::Incomplete),
            (b"\r\n\r\n", HeadScan::Incomplete),
            (b"", HeadScan::Incomplete),
        ];
        for (buf, expected) in cases {
            let shown = String::from_utf8_lossy(buf);
            assert_eq!(scan_whole(buf, 1024), *expected, "{shown:?}");
            assert_eq!(scan_bytewise(buf, 1024), *expected, "{shown:?} bytewise");
        }
    }

    #[test]
    fn a_head_over_the_byte_limit_is_too_large_complete_or_not() {
        let head = b"POST / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(scan_whole(head, head.len()), HeadScan::Complete(head.len()));
        assert_eq!(scan_whole(head, head.len() - 1), HeadScan::TooLarge);
        assert_eq!(scan_whole(&[b'x'; 100], 99), HeadScan::TooLarge);
        assert_eq!(scan_bytewise(&[b'x'; 100], 99), HeadScan::TooLarge);
    }

    #[test]
    fn more_header_lines_than_the_parser_takes_are_too_large() {
        let head = |headers: usize| {
            let mut h = b"GET / HTTP/1.1\r\n".to_vec();
            for i in 0..headers {
                h.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
            }
            h.extend_from_slice(b"\r\n");
            h
        };
        let most = head(MAX_HEADER_LINES);
        assert_eq!(scan_whole(&most, 1 << 20), HeadScan::Complete(most.len()));
        assert_eq!(
            scan_bytewise(&most, 1 << 20),
            HeadScan::Complete(most.len())
        );
        assert_eq!(
            scan_whole(&head(MAX_HEADER_LINES + 1), 1 << 20),
            HeadScan::TooLarge
        );
    }
}

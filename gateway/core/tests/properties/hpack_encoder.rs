//! A small HPACK encoder (RFC 7541), written here for the properties to feed the decoder:
//! every representation, raw or Huffman strings, and its own model of the dynamic table,
//! which the decoder's must match after every block.

use std::collections::VecDeque;

use turnpike_core::h2_watch::huffman;

/// Some of RFC 7541 Appendix A, with their indexes: enough for the encoder to index static
/// names and fields, and to check the decoder's table where it is not all checked already.
pub const STATIC_SAMPLE: [(usize, &str, &str); 16] = [
    (1, ":authority", ""),
    (2, ":method", "GET"),
    (3, ":method", "POST"),
    (4, ":path", "/"),
    (5, ":path", "/index.html"),
    (6, ":scheme", "http"),
    (7, ":scheme", "https"),
    (8, ":status", "200"),
    (16, "accept-encoding", "gzip, deflate"),
    (19, "accept", ""),
    (23, "authorization", ""),
    (28, "content-length", ""),
    (31, "content-type", ""),
    (32, "cookie", ""),
    (58, "user-agent", ""),
    (61, "www-authenticate", ""),
];

/// How a field is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Representation {
    /// By index when the table holds the whole field, else as `Incremental`.
    Indexed,
    Incremental,
    WithoutIndexing,
    NeverIndexed,
}

/// The encoder's choices for one field.
#[derive(Debug, Clone, Copy)]
pub struct Choice {
    pub representation: Representation,
    /// Name by index when a table holds it.
    pub name_by_index: bool,
    pub huffman_name: bool,
    pub huffman_value: bool,
}

impl Choice {
    /// Every field a literal added to the table, strings Huffman-coded: as browsers send.
    pub const TYPICAL: Choice = Choice {
        representation: Representation::Incremental,
        name_by_index: true,
        huffman_name: true,
        huffman_value: true,
    };
}

pub struct Encoder {
    /// Newest first.
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    capacity: usize,
}

impl Encoder {
    pub fn new(capacity: usize) -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            capacity,
        }
    }

    /// The entries, newest first.
    pub fn entries(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.table.iter().cloned().collect()
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// A dynamic table size update; only at the start of a block.
    pub fn size_update(&mut self, out: &mut Vec<u8>, capacity: usize) {
        integer(out, 0x20, 5, capacity);
        self.capacity = capacity;
        self.evict(0);
    }

    pub fn field(&mut self, out: &mut Vec<u8>, name: &[u8], value: &[u8], choice: Choice) {
        let mut representation = choice.representation;
        if representation == Representation::Indexed {
            match self.find(|n, v| n == name && v == value) {
                Some(index) => return integer(out, 0x80, 7, index),
                None => representation = Representation::Incremental,
            }
        }
        let name_index = match choice.name_by_index {
            true => self.find(|n, _| n == name).unwrap_or(0),
            false => 0,
        };
        match representation {
            Representation::Incremental => integer(out, 0x40, 6, name_index),
            Representation::WithoutIndexing => integer(out, 0x00, 4, name_index),
            _ => integer(out, 0x10, 4, name_index),
        }
        if name_index == 0 {
            string(out, name, choice.huffman_name);
        }
        string(out, value, choice.huffman_value);
        if representation == Representation::Incremental {
            self.insert(name, value);
        }
    }

    /// The lowest index whose entry `matches`, static sample first.
    fn find(&self, matches: impl Fn(&[u8], &[u8]) -> bool) -> Option<usize> {
        let in_static = STATIC_SAMPLE
            .iter()
            .find(|(_, name, value)| matches(name.as_bytes(), value.as_bytes()))
            .map(|(index, _, _)| *index);
        in_static.or_else(|| {
            self.table
                .iter()
                .position(|(name, value)| matches(name, value))
                .map(|at| at + 62)
        })
    }

    fn insert(&mut self, name: &[u8], value: &[u8]) {
        let size = name.len() + value.len() + 32;
        if size > self.capacity {
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.table.push_front((name.to_vec(), value.to_vec()));
        self.size += size;
    }

    /// Evicts the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.capacity {
            let (name, value) = self.table.pop_back().expect("the size counts some entry");
            self.size -= name.len() + value.len() + 32;
        }
    }
}

/// An integer in the low `prefix_bits` of a first byte carrying `pattern` (RFC 7541 §5.1).
pub fn integer(out: &mut Vec<u8>, pattern: u8, prefix_bits: u32, value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(pattern | value as u8);
        return;
    }
    out.push(pattern | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push(0x80 | (rest % 128) as u8);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// A string literal, raw or Huffman-coded (RFC 7541 §5.2).
pub fn string(out: &mut Vec<u8>, text: &[u8], huffman_coded: bool) {
    if !huffman_coded {
        integer(out, 0x00, 7, text.len());
        out.extend_from_slice(text);
        return;
    }
    let coded = huffman_code(text);
    integer(out, 0x80, 7, coded.len());
    out.extend_from_slice(&coded);
}

/// `text` in the Huffman code, padded with the first bits of EOS (ones).
pub fn huffman_code(text: &[u8]) -> Vec<u8> {
    let (mut coded, mut bits, mut held) = (Vec::new(), 0u64, 0u32);
    for &byte in text {
        let (code, length) = huffman::code(byte);
        bits = bits << length | u64::from(code);
        held += length;
        while held >= 8 {
            held -= 8;
            coded.push((bits >> held) as u8);
        }
        bits &= (1 << held) - 1;
    }
    if held > 0 {
        coded.push((bits << (8 - held)) as u8 | (0xff >> held));
    }
    coded
}

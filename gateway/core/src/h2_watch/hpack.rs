//! An HPACK decoder (RFC 7541): header blocks in, header fields out, one dynamic table kept
//! across the blocks of a connection.
//!
//! Built to read what a client sends, not to trust it: every length and index is checked
//! against the block and the tables, every error is a value, and memory is bounded by the
//! input. A string literal may not be longer than what is left of its block (so the caller's
//! bound on a block bounds every string, and a Huffman-coded one decodes to at most 8/5 of
//! it); the dynamic table never exceeds the maximum the decoder was made with (the
//! `SETTINGS_HEADER_TABLE_SIZE` the server advertises). Fields are handed to a callback as
//! borrowed bytes: a raw string is read in place, a Huffman-coded one into a buffer the
//! decoder reuses, and only a field added to the dynamic table is copied.

use std::fmt;

use super::huffman::{self, HuffmanError};
use super::table::{DynamicTable, Entry, STATIC_LEN};

/// `SETTINGS_HEADER_TABLE_SIZE` when the server sends none (RFC 9113 §6.5.2).
pub const DEFAULT_HEADER_TABLE_SIZE: usize = 4096;

/// Continuation bytes an integer may take (RFC 7541 §5.1): five carry 35 bits, far past any
/// length or index a block could hold, and more than the `h2` crate accepts.
const MAX_INTEGER_CONTINUATIONS: u32 = 5;

/// Scratch buffers are kept between blocks up to this capacity, and freed above it, so one
/// large header does not pin its memory for the rest of the connection.
const SCRATCH_KEPT: usize = 16 * 1024;

/// Why a header block could not be decoded. Any of these is a connection error
/// (`COMPRESSION_ERROR`, RFC 9113 §4.3): the decoder's state is no longer known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HpackError {
    /// The block ends inside a representation: an integer, or a string longer than the rest.
    Truncated,
    /// An integer with more continuation bytes than any real value needs.
    IntegerOverflow,
    /// Index 0, or an index past the static and dynamic tables.
    BadIndex(usize),
    /// A dynamic table size update above the decoder's maximum.
    TableSizeOverLimit { requested: usize, limit: usize },
    /// A dynamic table size update after a field (RFC 7541 §4.2: only at a block's start).
    TableSizeUpdateNotFirst,
    /// A Huffman-coded string that is not valid.
    Huffman(HuffmanError),
}

impl fmt::Display for HpackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => f.write_str("header block ends inside a representation"),
            Self::IntegerOverflow => f.write_str("integer too long"),
            Self::BadIndex(index) => write!(f, "no table entry at index {index}"),
            Self::TableSizeOverLimit { requested, limit } => {
                write!(f, "dynamic table size {requested} over the limit {limit}")
            }
            Self::TableSizeUpdateNotFirst => f.write_str("dynamic table size update after a field"),
            Self::Huffman(problem) => problem.fmt(f),
        }
    }
}

impl std::error::Error for HpackError {}

impl From<HuffmanError> for HpackError {
    fn from(problem: HuffmanError) -> Self {
        Self::Huffman(problem)
    }
}

/// The decoding side of one connection's HPACK context.
#[derive(Debug)]
pub struct HpackDecoder {
    table: DynamicTable,
    /// The largest dynamic table size an encoder may ask for.
    limit: usize,
    /// Huffman-decoded names and values, reused from field to field.
    name_scratch: Vec<u8>,
    value_scratch: Vec<u8>,
}

impl Default for HpackDecoder {
    fn default() -> Self {
        Self::new(DEFAULT_HEADER_TABLE_SIZE)
    }
}

impl HpackDecoder {
    /// How many static entries come before the dynamic ones (61): the newest dynamic entry
    /// is at index `STATIC_ENTRIES + 1`.
    pub const STATIC_ENTRIES: usize = STATIC_LEN;

    /// A decoder whose dynamic table may grow to `max_table_size` bytes (RFC 7541's size), the
    /// `SETTINGS_HEADER_TABLE_SIZE` the server advertised. The table starts at that size.
    pub fn new(max_table_size: usize) -> Self {
        Self {
            table: DynamicTable::new(max_table_size),
            limit: max_table_size,
            name_scratch: Vec::new(),
            value_scratch: Vec::new(),
        }
    }

    /// Decodes one whole header block, calling `each_field(name, value)` for every field in
    /// order. Blocks must come in the order the peer encoded them: each may change the table
    /// the next is read with. After an error the table is in an unknown state and the
    /// decoder must not be used again (the connection is over).
    pub fn decode(
        &mut self,
        block: &[u8],
        mut each_field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), HpackError> {
        let result = self.decode_fields(block, &mut each_field);
        for scratch in [&mut self.name_scratch, &mut self.value_scratch] {
            if scratch.capacity() > SCRATCH_KEPT {
                *scratch = Vec::new();
            }
        }
        result
    }

    fn decode_fields(
        &mut self,
        block: &[u8],
        each_field: &mut impl FnMut(&[u8], &[u8]),
    ) -> Result<(), HpackError> {
        let mut reader = Reader { block, at: 0 };
        let mut fields_seen = false;
        while let Some(first) = reader.peek() {
            if first & 0x80 != 0 {
                // Indexed field (§6.1).
                let index = reader.integer(7)?;
                let (name, value) = self.table.get(index).ok_or(HpackError::BadIndex(index))?;
                each_field(name, value);
            } else if first & 0xc0 == 0x40 {
                // Literal with incremental indexing (§6.2.1).
                self.literal(&mut reader, 6, true, each_field)?;
            } else if first & 0xe0 == 0x20 {
                // Dynamic table size update (§6.3).
                if fields_seen {
                    return Err(HpackError::TableSizeUpdateNotFirst);
                }
                let requested = reader.integer(5)?;
                if requested > self.limit {
                    return Err(HpackError::TableSizeOverLimit {
                        requested,
                        limit: self.limit,
                    });
                }
                self.table.set_capacity(requested);
                continue;
            } else {
                // Literal without indexing (0000) or never indexed (0001), §6.2.2 and §6.2.3:
                // the same to a decoder that forwards nothing.
                self.literal(&mut reader, 4, false, each_field)?;
            }
            fields_seen = true;
        }
        Ok(())
    }

    /// A literal field whose first byte holds the name's index in its low `prefix_bits`
    /// (0: a literal name follows), then its value; added to the table when `indexed`.
    fn literal(
        &mut self,
        reader: &mut Reader<'_>,
        prefix_bits: u32,
        indexed: bool,
        each_field: &mut impl FnMut(&[u8], &[u8]),
    ) -> Result<(), HpackError> {
        let Self {
            table,
            name_scratch,
            value_scratch,
            ..
        } = self;
        let name_index = reader.integer(prefix_bits)?;
        let name = match name_index {
            0 => reader.string(name_scratch)?,
            _ => {
                table
                    .get(name_index)
                    .ok_or(HpackError::BadIndex(name_index))?
                    .0
            }
        };
        let value = reader.string(value_scratch)?;
        if !indexed {
            each_field(name, value);
        } else if table.fits(name, value) {
            let entry = Entry::new(name, value);
            each_field(entry.name(), entry.value());
            table.insert(entry);
        } else {
            // Too large for the table: it empties it and is not added (§4.4).
            each_field(name, value);
            table.clear();
        }
        Ok(())
    }

    /// The dynamic table's size by RFC 7541's measure (each entry's name, value and 32).
    pub fn table_size(&self) -> usize {
        self.table.size()
    }

    /// The size the dynamic table may grow to now: the last size update, or the maximum.
    pub fn table_capacity(&self) -> usize {
        self.table.capacity()
    }

    /// The dynamic table's entries, newest first (index 62 is the first).
    pub fn table_entries(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.table.entries()
    }
}

/// A cursor over one block.
struct Reader<'block> {
    block: &'block [u8],
    at: usize,
}

impl<'block> Reader<'block> {
    fn peek(&self) -> Option<u8> {
        self.block.get(self.at).copied()
    }

    fn byte(&mut self) -> Result<u8, HpackError> {
        let byte = self.peek().ok_or(HpackError::Truncated)?;
        self.at += 1;
        Ok(byte)
    }

    /// An integer whose first byte holds it in the low `prefix_bits` bits (RFC 7541 §5.1).
    fn integer(&mut self, prefix_bits: u32) -> Result<usize, HpackError> {
        let mask = (1u8 << prefix_bits) - 1;
        let prefix = self.byte()? & mask;
        if prefix < mask {
            return Ok(usize::from(prefix));
        }
        let mut value = u64::from(mask);
        for continuation in 0..MAX_INTEGER_CONTINUATIONS {
            let byte = self.byte()?;
            value += u64::from(byte & 0x7f) << (7 * continuation);
            if byte & 0x80 == 0 {
                return usize::try_from(value).map_err(|_| HpackError::IntegerOverflow);
            }
        }
        Err(HpackError::IntegerOverflow)
    }

    /// A string literal (RFC 7541 §5.2): read in place when raw, decoded into `scratch` when
    /// Huffman-coded. Its length may not pass the end of the block.
    fn string<'out>(&mut self, scratch: &'out mut Vec<u8>) -> Result<&'out [u8], HpackError>
    where
        'block: 'out,
    {
        let huffman_coded = self.peek().ok_or(HpackError::Truncated)? & 0x80 != 0;
        let length = self.integer(7)?;
        let rest = &self.block[self.at..];
        if length > rest.len() {
            return Err(HpackError::Truncated);
        }
        let raw = &rest[..length];
        self.at += length;
        if !huffman_coded {
            return Ok(raw);
        }
        scratch.clear();
        huffman::decode(raw, scratch)?;
        Ok(scratch)
    }
}

#[cfg(test)]
mod tests;

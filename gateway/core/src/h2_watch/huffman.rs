//! The Huffman code of HPACK string literals (RFC 7541 §5.2, Appendix B), decoded.
//!
//! The code is canonical: within each length, codes are consecutive and ordered by symbol,
//! and each length's first code follows from the counts of the shorter ones. So decoding needs
//! no tree: for a candidate length `L`, the next `L` bits are a code exactly when they fall in
//! that length's range, and the symbol is found by its offset in the range. The tables for that
//! are derived from [`CODES`] at compile time, and a test checks that every code in the table
//! decodes back to its own symbol (which holds only if the table is canonical).

use std::fmt;

/// The end-of-string symbol, which an encoder never writes inside a string.
const EOS: u16 = 256;

/// The longest code, in bits (EOS and a few control bytes).
const LONGEST: usize = 30;

/// RFC 7541 Appendix B: `(code, length in bits)` for the bytes 0 to 255 and then EOS, each
/// code in the low bits of its `u32`.
#[rustfmt::skip]
const CODES: [(u32, u8); 257] = [
    (0x1ff8, 13),      (0x7fffd8, 23),    (0xfffffe2, 28),   (0xfffffe3, 28),  // 0..=3
    (0xfffffe4, 28),   (0xfffffe5, 28),   (0xfffffe6, 28),   (0xfffffe7, 28),  // 4..=7
    (0xfffffe8, 28),   (0xffffea, 24),    (0x3ffffffc, 30),  (0xfffffe9, 28),  // 8..=11
    (0xfffffea, 28),   (0x3ffffffd, 30),  (0xfffffeb, 28),   (0xfffffec, 28),  // 12..=15
    (0xfffffed, 28),   (0xfffffee, 28),   (0xfffffef, 28),   (0xffffff0, 28),  // 16..=19
    (0xffffff1, 28),   (0xffffff2, 28),   (0x3ffffffe, 30),  (0xffffff3, 28),  // 20..=23
    (0xffffff4, 28),   (0xffffff5, 28),   (0xffffff6, 28),   (0xffffff7, 28),  // 24..=27
    (0xffffff8, 28),   (0xffffff9, 28),   (0xffffffa, 28),   (0xffffffb, 28),  // 28..=31
    (0x14, 6),         (0x3f8, 10),       (0x3f9, 10),       (0xffa, 12),      // 32..=35
    (0x1ff9, 13),      (0x15, 6),         (0xf8, 8),         (0x7fa, 11),      // 36..=39
    (0x3fa, 10),       (0x3fb, 10),       (0xf9, 8),         (0x7fb, 11),      // 40..=43
    (0xfa, 8),         (0x16, 6),         (0x17, 6),         (0x18, 6),        // 44..=47
    (0x0, 5),          (0x1, 5),          (0x2, 5),          (0x19, 6),        // 48..=51
    (0x1a, 6),         (0x1b, 6),         (0x1c, 6),         (0x1d, 6),        // 52..=55
    (0x1e, 6),         (0x1f, 6),         (0x5c, 7),         (0xfb, 8),        // 56..=59
    (0x7ffc, 15),      (0x20, 6),         (0xffb, 12),       (0x3fc, 10),      // 60..=63
    (0x1ffa, 13),      (0x21, 6),         (0x5d, 7),         (0x5e, 7),        // 64..=67
    (0x5f, 7),         (0x60, 7),         (0x61, 7),         (0x62, 7),        // 68..=71
    (0x63, 7),         (0x64, 7),         (0x65, 7),         (0x66, 7),        // 72..=75
    (0x67, 7),         (0x68, 7),         (0x69, 7),         (0x6a, 7),        // 76..=79
    (0x6b, 7),         (0x6c, 7),         (0x6d, 7),         (0x6e, 7),        // 80..=83
    (0x6f, 7),         (0x70, 7),         (0x71, 7),         (0x72, 7),        // 84..=87
    (0xfc, 8),         (0x73, 7),         (0xfd, 8),         (0x1ffb, 13),     // 88..=91
    (0x7fff0, 19),     (0x1ffc, 13),      (0x3ffc, 14),      (0x22, 6),        // 92..=95
    (0x7ffd, 15),      (0x3, 5),          (0x23, 6),         (0x4, 5),         // 96..=99
    (0x24, 6),         (0x5, 5),          (0x25, 6),         (0x26, 6),        // 100..=103
    (0x27, 6),         (0x6, 5),          (0x74, 7),         (0x75, 7),        // 104..=107
    (0x28, 6),         (0x29, 6),         (0x2a, 6),         (0x7, 5),         // 108..=111
    (0x2b, 6),         (0x76, 7),         (0x2c, 6),         (0x8, 5),         // 112..=115
    (0x9, 5),          (0x2d, 6),         (0x77, 7),         (0x78, 7),        // 116..=119
    (0x79, 7),         (0x7a, 7),         (0x7b, 7),         (0x7ffe, 15),     // 120..=123
    (0x7fc, 11),       (0x3ffd, 14),      (0x1ffd, 13),      (0xffffffc, 28),  // 124..=127
    (0xfffe6, 20),     (0x3fffd2, 22),    (0xfffe7, 20),     (0xfffe8, 20),    // 128..=131
    (0x3fffd3, 22),    (0x3fffd4, 22),    (0x3fffd5, 22),    (0x7fffd9, 23),   // 132..=135
    (0x3fffd6, 22),    (0x7fffda, 23),    (0x7fffdb, 23),    (0x7fffdc, 23),   // 136..=139
    (0x7fffdd, 23),    (0x7fffde, 23),    (0xffffeb, 24),    (0x7fffdf, 23),   // 140..=143
    (0xffffec, 24),    (0xffffed, 24),    (0x3fffd7, 22),    (0x7fffe0, 23),   // 144..=147
    (0xffffee, 24),    (0x7fffe1, 23),    (0x7fffe2, 23),    (0x7fffe3, 23),   // 148..=151
    (0x7fffe4, 23),    (0x1fffdc, 21),    (0x3fffd8, 22),    (0x7fffe5, 23),   // 152..=155
    (0x3fffd9, 22),    (0x7fffe6, 23),    (0x7fffe7, 23),    (0xffffef, 24),   // 156..=159
    (0x3fffda, 22),    (0x1fffdd, 21),    (0xfffe9, 20),     (0x3fffdb, 22),   // 160..=163
    (0x3fffdc, 22),    (0x7fffe8, 23),    (0x7fffe9, 23),    (0x1fffde, 21),   // 164..=167
    (0x7fffea, 23),    (0x3fffdd, 22),    (0x3fffde, 22),    (0xfffff0, 24),   // 168..=171
    (0x1fffdf, 21),    (0x3fffdf, 22),    (0x7fffeb, 23),    (0x7fffec, 23),   // 172..=175
    (0x1fffe0, 21),    (0x1fffe1, 21),    (0x3fffe0, 22),    (0x1fffe2, 21),   // 176..=179
    (0x7fffed, 23),    (0x3fffe1, 22),    (0x7fffee, 23),    (0x7fffef, 23),   // 180..=183
    (0xfffea, 20),     (0x3fffe2, 22),    (0x3fffe3, 22),    (0x3fffe4, 22),   // 184..=187
    (0x7ffff0, 23),    (0x3fffe5, 22),    (0x3fffe6, 22),    (0x7ffff1, 23),   // 188..=191
    (0x3ffffe0, 26),   (0x3ffffe1, 26),   (0xfffeb, 20),     (0x7fff1, 19),    // 192..=195
    (0x3fffe7, 22),    (0x7ffff2, 23),    (0x3fffe8, 22),    (0x1ffffec, 25),  // 196..=199
    (0x3ffffe2, 26),   (0x3ffffe3, 26),   (0x3ffffe4, 26),   (0x7ffffde, 27),  // 200..=203
    (0x7ffffdf, 27),   (0x3ffffe5, 26),   (0xfffff1, 24),    (0x1ffffed, 25),  // 204..=207
    (0x7fff2, 19),     (0x1fffe3, 21),    (0x3ffffe6, 26),   (0x7ffffe0, 27),  // 208..=211
    (0x7ffffe1, 27),   (0x3ffffe7, 26),   (0x7ffffe2, 27),   (0xfffff2, 24),   // 212..=215
    (0x1fffe4, 21),    (0x1fffe5, 21),    (0x3ffffe8, 26),   (0x3ffffe9, 26),  // 216..=219
    (0xffffffd, 28),   (0x7ffffe3, 27),   (0x7ffffe4, 27),   (0x7ffffe5, 27),  // 220..=223
    (0xfffec, 20),     (0xfffff3, 24),    (0xfffed, 20),     (0x1fffe6, 21),   // 224..=227
    (0x3fffe9, 22),    (0x1fffe7, 21),    (0x1fffe8, 21),    (0x7ffff3, 23),   // 228..=231
    (0x3fffea, 22),    (0x3fffeb, 22),    (0x1ffffee, 25),   (0x1ffffef, 25),  // 232..=235
    (0xfffff4, 24),    (0xfffff5, 24),    (0x3ffffea, 26),   (0x7ffff4, 23),   // 236..=239
    (0x3ffffeb, 26),   (0x7ffffe6, 27),   (0x3ffffec, 26),   (0x3ffffed, 26),  // 240..=243
    (0x7ffffe7, 27),   (0x7ffffe8, 27),   (0x7ffffe9, 27),   (0x7ffffea, 27),  // 244..=247
    (0x7ffffeb, 27),   (0xffffffe, 28),   (0x7ffffec, 27),   (0x7ffffed, 27),  // 248..=251
    (0x7ffffee, 27),   (0x7ffffef, 27),   (0x7fffff0, 27),   (0x3ffffee, 26),  // 252..=255
    (0x3fffffff, 30),                                                          // 256, EOS
];

/// Why a Huffman-coded string literal is refused (RFC 7541 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HuffmanError {
    /// The EOS symbol inside the string: an encoder never writes it.
    EndOfStringInside,
    /// More than 7 bits left after the last symbol.
    PaddingTooLong,
    /// Bits left after the last symbol that are not all ones (the start of EOS).
    PaddingNotOnes,
}

impl fmt::Display for HuffmanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::EndOfStringInside => "EOS inside a Huffman-coded string",
            Self::PaddingTooLong => "Huffman padding longer than 7 bits",
            Self::PaddingNotOnes => "Huffman padding that is not all ones",
        })
    }
}

impl std::error::Error for HuffmanError {}

/// The code RFC 7541 assigns to `byte`: `(code, length in bits)`, the code in the low bits.
/// The gateway only decodes; this is for encoders (the tests write header blocks with it).
pub fn code(byte: u8) -> (u32, u32) {
    let (code, length) = CODES[usize::from(byte)];
    (code, u32::from(length))
}

/// Decodes a Huffman-coded string literal, appending the bytes to `out`.
///
/// Never allocates more than 8/5 of `encoded` (the shortest code has 5 bits), so a caller that
/// bounds its input bounds this too.
pub fn decode(encoded: &[u8], out: &mut Vec<u8>) -> Result<(), HuffmanError> {
    out.reserve(encoded.len() / 5 * 8 + 8);
    // The bits not yet decoded, in the low `held` bits of `bits`.
    let mut bits: u64 = 0;
    let mut held: usize = 0;
    let mut bytes = encoded.iter();
    loop {
        // Keep at least LONGEST bits at hand while input remains, so a symbol is always found
        // whole; at most 64 bits are held, and at least one symbol is taken before the next
        // shift.
        while held <= 56 {
            match bytes.next() {
                Some(&byte) => {
                    bits = bits << 8 | u64::from(byte);
                    held += 8;
                }
                None => break,
            }
        }
        if held == 0 {
            return Ok(());
        }
        match next_symbol(bits, held) {
            Some((symbol, length)) => {
                if symbol == EOS {
                    return Err(HuffmanError::EndOfStringInside);
                }
                out.push(symbol as u8);
                held -= length;
                bits &= (1u64 << held) - 1;
            }
            // The code is complete (every string of LONGEST bits starts with a code), so no
            // symbol means fewer than LONGEST bits are left and the input is spent: the rest is
            // padding, which must be the first bits of EOS and shorter than a byte.
            None if held > 7 => return Err(HuffmanError::PaddingTooLong),
            None if bits != (1u64 << held) - 1 => return Err(HuffmanError::PaddingNotOnes),
            None => return Ok(()),
        }
    }
}

/// The symbol whose code starts the `held` bits of `bits` (those above them are zero), and the
/// code's length; `None` when no whole code is there.
fn next_symbol(bits: u64, held: usize) -> Option<(u16, usize)> {
    let table = &CANONICAL;
    for length in SHORTEST..=held.min(LONGEST) {
        // At most LONGEST bits, so it fits.
        let candidate = (bits >> (held - length)) as u32;
        let rank = candidate.wrapping_sub(table.first[length]);
        if rank < table.count[length] {
            let at = (table.offset[length] + rank) as usize;
            return Some((table.symbols[at], length));
        }
    }
    None
}

/// The shortest code, in bits.
const SHORTEST: usize = 5;

/// The canonical code's shape, per code length: the first code of that length, how many codes
/// have it, and where their symbols start in `symbols`.
struct Canonical {
    first: [u32; LONGEST + 1],
    count: [u32; LONGEST + 1],
    offset: [u32; LONGEST + 1],
    /// The symbols by code length, then by value: the order canonical codes are handed out in.
    symbols: [u16; 257],
}

static CANONICAL: Canonical = canonical();

const fn canonical() -> Canonical {
    let mut count = [0u32; LONGEST + 1];
    let mut symbol = 0;
    while symbol < CODES.len() {
        count[CODES[symbol].1 as usize] += 1;
        symbol += 1;
    }
    let mut first = [0u32; LONGEST + 1];
    let mut offset = [0u32; LONGEST + 1];
    let mut symbols = [0u16; 257];
    let (mut next_code, mut next_offset) = (0u32, 0u32);
    let mut length = 1;
    while length <= LONGEST {
        // Each length's codes follow the shorter ones', one bit longer.
        next_code <<= 1;
        first[length] = next_code;
        offset[length] = next_offset;
        let mut symbol = 0;
        while symbol < CODES.len() {
            if CODES[symbol].1 as usize == length {
                symbols[next_offset as usize] = symbol as u16;
                next_offset += 1;
            }
            symbol += 1;
        }
        next_code += count[length];
        length += 1;
    }
    Canonical {
        first,
        count,
        offset,
        symbols,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `codes` packed MSB first and padded with ones, as an encoder writes them.
    fn pack(codes: &[(u32, u32)]) -> Vec<u8> {
        let (mut out, mut bits, mut held) = (Vec::new(), 0u64, 0u32);
        for &(code, length) in codes {
            bits = bits << length | u64::from(code);
            held += length;
            while held >= 8 {
                held -= 8;
                out.push((bits >> held) as u8);
            }
        }
        if held > 0 {
            out.push((bits << (8 - held)) as u8 | (0xff >> held));
        }
        out
    }

    fn decoded(encoded: &[u8]) -> Result<Vec<u8>, HuffmanError> {
        let mut out = Vec::new();
        decode(encoded, &mut out).map(|()| out)
    }

    #[test]
    fn the_code_is_complete_so_any_bits_start_with_a_code() {
        // Kraft's sum is exactly one: no string of LONGEST bits is left without a code.
        let sum: u64 = CODES
            .iter()
            .map(|&(_, length)| 1u64 << (LONGEST - length as usize))
            .sum();
        assert_eq!(sum, 1 << LONGEST);
    }

    #[test]
    fn every_code_in_the_table_decodes_to_its_own_symbol() {
        // Holds only when the transcribed table is the canonical code the decoder assumes.
        for (symbol, &(code, length)) in CODES.iter().enumerate() {
            let found = next_symbol(u64::from(code), usize::from(length));
            assert_eq!(
                found,
                Some((symbol as u16, usize::from(length))),
                "{symbol}"
            );
        }
        let all: Vec<u8> = (0..=255).collect();
        let codes: Vec<_> = all.iter().map(|&byte| code(byte)).collect();
        assert_eq!(decoded(&pack(&codes)), Ok(all));
    }

    #[test]
    fn rfc_strings_decode() {
        // RFC 7541 C.4.1 and C.4.2.
        let www = [
            0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
        ];
        assert_eq!(decoded(&www).unwrap(), b"www.example.com");
        let no_cache = [0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf];
        assert_eq!(decoded(&no_cache).unwrap(), b"no-cache");
        assert_eq!(decoded(&[]).unwrap(), b"");
    }

    #[test]
    fn padding_must_be_short_and_all_ones() {
        // 'a' is 00011: three bits of padding.
        assert_eq!(decoded(&[0b0001_1111]).unwrap(), b"a");
        assert_eq!(decoded(&[0b0001_1000]), Err(HuffmanError::PaddingNotOnes));
        assert_eq!(decoded(&[0b0001_1101]), Err(HuffmanError::PaddingNotOnes));
        // A whole byte of ones after the 'a': eleven bits of padding.
        assert_eq!(
            decoded(&[0b0001_1111, 0xff]),
            Err(HuffmanError::PaddingTooLong)
        );
        assert_eq!(decoded(&[0xff]), Err(HuffmanError::PaddingTooLong));
        // The first bits of a long code, cut off: no code, and not padding either.
        assert_eq!(decoded(&[0xff, 0xfe]), Err(HuffmanError::PaddingTooLong));
    }

    #[test]
    fn end_of_string_is_refused_wherever_it_is() {
        let eos = (CODES[256].0, u32::from(CODES[256].1));
        assert_eq!(decoded(&pack(&[eos])), Err(HuffmanError::EndOfStringInside));
        let a = code(b'a');
        assert_eq!(
            decoded(&pack(&[a, eos, a])),
            Err(HuffmanError::EndOfStringInside)
        );
    }
}

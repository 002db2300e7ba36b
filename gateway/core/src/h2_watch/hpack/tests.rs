//! The decoder against the errors a client can send; RFC 7541 Appendix C's examples are in
//! [`appendix_c`].

use super::*;

mod appendix_c;

type Fields = Vec<(String, String)>;

/// Hex as the RFC prints it: pairs of digits, spaces anywhere.
fn hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn decode(decoder: &mut HpackDecoder, block: &[u8]) -> Result<Fields, HpackError> {
    let mut fields = Vec::new();
    decoder
        .decode(block, |name, value| fields.push((text(name), text(value))))
        .map(|()| fields)
}

fn fields(list: &[(&str, &str)]) -> Fields {
    list.iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

fn table(decoder: &HpackDecoder) -> Fields {
    decoder
        .table_entries()
        .map(|(name, value)| (text(name), text(value)))
        .collect()
}

#[test]
fn indexes_must_name_an_entry() {
    let mut decoder = HpackDecoder::default();
    assert_eq!(decode(&mut decoder, &[0x80]), Err(HpackError::BadIndex(0)));
    let mut decoder = HpackDecoder::default();
    // 62 is the first dynamic index, and the table is empty.
    assert_eq!(decode(&mut decoder, &[0xbe]), Err(HpackError::BadIndex(62)));
    let mut decoder = HpackDecoder::default();
    assert_eq!(
        decode(&mut decoder, &[0x82, 0xff, 0x00]),
        Err(HpackError::BadIndex(127))
    );
    // A literal's name index: 63 + 32.
    let mut decoder = HpackDecoder::default();
    assert_eq!(
        decode(&mut decoder, &[0x7f, 0x20, 0x01, b'x']),
        Err(HpackError::BadIndex(95))
    );
    let mut decoder = HpackDecoder::default();
    assert_eq!(
        decode(&mut decoder, &hex("0f2f 0178")),
        Err(HpackError::BadIndex(62))
    );
    // Once the table holds an entry, 62 names it and 63 is still past the end.
    let mut decoder = HpackDecoder::default();
    decode(&mut decoder, &hex("4003 6162 6301 78")).unwrap();
    assert_eq!(decode(&mut decoder, &[0xbe]), Ok(fields(&[("abc", "x")])));
    assert_eq!(decode(&mut decoder, &[0xbf]), Err(HpackError::BadIndex(63)));
}

#[test]
fn table_size_updates_stay_within_the_limit_and_come_first() {
    let mut decoder = HpackDecoder::default();
    // 4096 = 31 + 97 + 31 * 128.
    assert_eq!(decode(&mut decoder, &[0x3f, 0xe1, 0x1f]), Ok(vec![]));
    assert_eq!(decoder.table_capacity(), 4096);
    assert_eq!(
        decode(&mut decoder, &[0x3f, 0xe2, 0x1f]),
        Err(HpackError::TableSizeOverLimit {
            requested: 4097,
            limit: 4096
        })
    );

    let mut decoder = HpackDecoder::default();
    assert_eq!(
        decode(&mut decoder, &[0x82, 0x20]),
        Err(HpackError::TableSizeUpdateNotFirst)
    );

    // Two updates at the start are allowed; the last one holds.
    let mut decoder = HpackDecoder::default();
    assert_eq!(
        decode(&mut decoder, &[0x20, 0x3f, 0x21, 0x82])
            .unwrap()
            .len(),
        1
    );
    assert_eq!(decoder.table_capacity(), 64);

    // Shrinking evicts; growing back does not bring entries back.
    let mut decoder = HpackDecoder::default();
    decode(
        &mut decoder,
        &hex("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d"),
    )
    .unwrap();
    assert_eq!(decoder.table_size(), 57);
    decode(&mut decoder, &[0x20, 0x3f, 0xe1, 0x1f]).unwrap();
    assert_eq!((decoder.table_size(), decoder.table_capacity()), (0, 4096));
    assert_eq!(decode(&mut decoder, &[0xbe]), Err(HpackError::BadIndex(62)));
}

#[test]
fn a_smaller_settings_limit_is_enforced() {
    let mut decoder = HpackDecoder::new(0);
    assert_eq!(
        decode(&mut decoder, &[0x21]),
        Err(HpackError::TableSizeOverLimit {
            requested: 1,
            limit: 0
        })
    );
    // With no room, an indexed literal is decoded and not kept.
    let mut decoder = HpackDecoder::new(0);
    assert_eq!(
        decode(&mut decoder, &hex("4003 6162 6301 78")),
        Ok(fields(&[("abc", "x")]))
    );
    assert_eq!(decoder.table_size(), 0);
}

#[test]
fn truncated_integers_and_strings() {
    for block in [
        &[0xff][..],
        &[0xff, 0x80],
        &[0x3f],
        &[0x40],
        &[0x40, 0x01],
        &[0x40, 0x01, b'a'],
        &[0x40, 0x05, b'a', b'b'],
        &[0x41, 0x83, 0xff],
        &[0x04],
        &[0x10, 0x01, b'a', 0x7f],
    ] {
        let mut decoder = HpackDecoder::default();
        assert_eq!(
            decode(&mut decoder, block),
            Err(HpackError::Truncated),
            "{block:x?}"
        );
    }
}

#[test]
fn integers_may_not_run_on() {
    let mut decoder = HpackDecoder::default();
    let six_continuations = [0xff, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00];
    assert_eq!(
        decode(&mut decoder, &six_continuations),
        Err(HpackError::IntegerOverflow)
    );
    // Five are fine, even with zero bits in them (an encoder may pad an integer).
    let mut decoder = HpackDecoder::default();
    assert_eq!(
        decode(&mut decoder, &[0xff, 0x80, 0x80, 0x80, 0x80, 0x00]),
        Err(HpackError::BadIndex(127))
    );
    // A huge string length is refused as longer than the block, not allocated.
    let mut decoder = HpackDecoder::default();
    assert_eq!(
        decode(&mut decoder, &[0x40, 0x7f, 0xff, 0xff, 0xff, 0xff, 0x0f]),
        Err(HpackError::Truncated)
    );
}

#[test]
fn bad_huffman_strings_are_refused() {
    // 'a' is 00011; then 000 is not padding.
    let mut decoder = HpackDecoder::default();
    assert_eq!(
        decode(&mut decoder, &[0x00, 0x81, 0b0001_1000, 0x01, b'x']),
        Err(HpackError::Huffman(HuffmanError::PaddingNotOnes))
    );
    let mut decoder = HpackDecoder::default();
    assert_eq!(
        decode(&mut decoder, &[0x00, 0x01, b'x', 0x82, 0b0001_1111, 0xff]),
        Err(HpackError::Huffman(HuffmanError::PaddingTooLong))
    );
    // Thirty ones are EOS.
    let mut decoder = HpackDecoder::default();
    assert_eq!(
        decode(
            &mut decoder,
            &[0x00, 0x01, b'x', 0x84, 0xff, 0xff, 0xff, 0xff]
        ),
        Err(HpackError::Huffman(HuffmanError::EndOfStringInside))
    );
}

#[test]
fn a_field_larger_than_the_table_empties_it() {
    let mut decoder = HpackDecoder::new(64);
    decode(&mut decoder, &hex("4003 6162 6301 78")).unwrap();
    assert_eq!(decoder.table_size(), 36);
    let long_value = "v".repeat(40);
    let mut block = hex("4003 6162 6328");
    block.extend_from_slice(long_value.as_bytes());
    assert_eq!(
        decode(&mut decoder, &block),
        Ok(vec![("abc".to_string(), long_value)])
    );
    assert_eq!((decoder.table_size(), table(&decoder)), (0, vec![]));
}

#[test]
fn a_name_from_the_entry_its_insertion_evicts_is_kept() {
    // RFC 7541 §4.4: the new entry may name the entry it evicts.
    let mut decoder = HpackDecoder::new(80);
    decode(&mut decoder, &hex("400a 6375 7374 6f6d 2d6b 6579 0178")).unwrap();
    assert_eq!(decoder.table_size(), 43);
    // Name: index 62 (custom-key); value: "yyyy", 46 bytes more, so the old entry goes.
    assert_eq!(
        decode(&mut decoder, &hex("7e04 7979 7979")),
        Ok(fields(&[("custom-key", "yyyy")]))
    );
    assert_eq!(table(&decoder), fields(&[("custom-key", "yyyy")]));
    assert_eq!(decoder.table_size(), 46);
}

#[test]
fn never_indexed_and_unindexed_fields_leave_the_table_alone() {
    let mut decoder = HpackDecoder::default();
    let block = hex("0003 6162 6301 78 1003 6162 6301 79 0f0d 017a");
    assert_eq!(
        decode(&mut decoder, &block),
        Ok(fields(&[
            ("abc", "x"),
            ("abc", "y"),
            ("content-length", "z")
        ]))
    );
    assert_eq!(decoder.table_size(), 0);
}

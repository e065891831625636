//! The byte <-> character map of byte-level BPE (GPT-2 and its descendants).
//!
//! Printable bytes stand for themselves; the other 68 bytes are shifted to the
//! characters U+0100.. in increasing byte order, so every byte has a visible,
//! whitespace-free character in the vocabulary files.

/// Whether byte `b` is represented by the character of the same code point.
const fn is_direct(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// `TABLE[c]` is the byte encoded by code point `c` (for `c < 324`), or -1.
static TABLE: [i16; 324] = build_table();

const fn build_table() -> [i16; 324] {
    let mut table = [-1i16; 324];
    let mut shifted = 0usize;
    let mut b = 0usize;
    while b < 256 {
        if is_direct(b as u8) {
            table[b] = b as i16;
        } else {
            table[256 + shifted] = b as i16;
            shifted += 1;
        }
        b += 1;
    }
    table
}

/// The byte that character `c` stands for, if it is one of the 256 mapped characters.
pub fn byte_of_char(c: char) -> Option<u8> {
    TABLE.get(c as usize).and_then(|&b| u8::try_from(b).ok())
}

/// The character that stands for byte `b`.
pub fn char_of_byte(b: u8) -> char {
    if is_direct(b) {
        b as char
    } else {
        let rank = (0..b).filter(|&x| !is_direct(x)).count() as u32;
        char::from_u32(256 + rank).expect("U+0100..U+0143 are valid characters")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_a_bijection() {
        for b in 0..=255u8 {
            assert_eq!(byte_of_char(char_of_byte(b)), Some(b));
        }
        assert_eq!(char_of_byte(b' '), '\u{120}'); // "Ġ"
        assert_eq!(char_of_byte(b'\n'), '\u{10A}'); // "Ċ"
        assert_eq!(byte_of_char('\u{144}'), None);
        assert_eq!(byte_of_char('\u{2581}'), None);
    }
}

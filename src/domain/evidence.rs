//! Evidence files (佐证材料): what a file is, read from its content, never from its name.

/// The types a case's evidence may be: a scan or a photo of the rectification, or a document.
pub const ALLOWED: &str = "PDF, JPEG, PNG, OFD or DOCX";

/// Most entries of a ZIP's central directory read to tell OFD from DOCX.
const ZIP_ENTRIES_MAX: usize = 10_000;

/// The content type of `bytes`, if it is one the hub takes:
/// - PDF (`%PDF-`), JPEG (`FF D8 FF`), PNG (its 8-byte signature);
/// - OFD (GB/T 33190, a ZIP holding `OFD.xml`) and DOCX (a ZIP holding `word/document.xml`),
///   told apart by the names in the ZIP's central directory.
///
/// A renamed executable, an HTML page or a ZIP of anything else is `None`.
pub fn content_type(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"%PDF-") {
        return Some("application/pdf");
    }
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Some("image/jpeg");
    }
    if bytes.starts_with(&[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A]) {
        return Some("image/png");
    }
    if bytes.starts_with(b"PK\x03\x04") {
        let names = zip_names(bytes)?;
        let has = |name: &str| names.iter().any(|n| n.eq_ignore_ascii_case(name));
        if has("OFD.xml") {
            return Some("application/ofd");
        }
        if has("word/document.xml") && has("[Content_Types].xml") {
            return Some("application/vnd.openxmlformats-officedocument.wordprocessingml.document");
        }
    }
    None
}

fn u16_at(b: &[u8], at: usize) -> Option<usize> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?) as usize)
}

fn u32_at(b: &[u8], at: usize) -> Option<usize> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
}

/// The entry names of a ZIP's central directory, read from the one end-of-directory record
/// (the last within the 64 KiB a comment may take), at most [`ZIP_ENTRIES_MAX`] of them:
/// linear in the directory's size, nothing decompressed. (A general ZIP reader tries every
/// end marker it finds; a file crafted with thousands of them cost hours of CPU.) `None`
/// when the directory is not well formed.
fn zip_names(b: &[u8]) -> Option<Vec<String>> {
    const EOCD: &[u8] = b"PK\x05\x06";
    const ENTRY: &[u8] = b"PK\x01\x02";
    let from = b.len().saturating_sub(22 + 65_535);
    let eocd = from + b[from..].windows(4).rposition(|w| w == EOCD)?;
    let count = u16_at(b, eocd + 10)?;
    let size = u32_at(b, eocd + 12)?;
    let offset = u32_at(b, eocd + 16)?;
    if count > ZIP_ENTRIES_MAX || offset.checked_add(size)? > eocd {
        return None;
    }
    let mut at = offset;
    let mut names = Vec::with_capacity(count);
    for _ in 0..count {
        if b.get(at..at + 4)? != ENTRY {
            return None;
        }
        let name_len = u16_at(b, at + 28)?;
        let extra = u16_at(b, at + 30)?;
        let comment = u16_at(b, at + 32)?;
        let name = b.get(at + 46..at + 46 + name_len)?;
        names.push(String::from_utf8_lossy(name).into_owned());
        at = at + 46 + name_len + extra + comment;
    }
    Some(names)
}

/// Why a file name cannot be kept, or `None`: no path, no control characters, 1–200
/// characters.
pub fn bad_file_name(name: &str) -> Option<&'static str> {
    let n = name.chars().count();
    if n == 0 {
        Some("is required")
    } else if n > 200 {
        Some("is longer than 200 characters")
    } else if name.chars().any(char::is_control) {
        Some("contains control characters")
    } else if name.contains(['/', '\\']) || name == "." || name == ".." {
        Some("must be a name, not a path")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ZIP of empty stored files with these names (local headers, central directory, end).
    fn zip_with(names: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut dir = Vec::new();
        for name in names {
            let offset = out.len() as u32;
            out.extend_from_slice(b"PK\x03\x04");
            out.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            out.extend_from_slice(&[0; 12]); // crc, sizes
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            dir.extend_from_slice(b"PK\x01\x02");
            dir.extend_from_slice(&[20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            dir.extend_from_slice(&[0; 12]);
            dir.extend_from_slice(&(name.len() as u16).to_le_bytes());
            dir.extend_from_slice(&[0; 12]); // extra, comment, disk, attributes
            dir.extend_from_slice(&offset.to_le_bytes());
            dir.extend_from_slice(name.as_bytes());
        }
        let cd_offset = out.len() as u32;
        out.extend_from_slice(&dir);
        out.extend_from_slice(b"PK\x05\x06");
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&(names.len() as u16).to_le_bytes());
        out.extend_from_slice(&(names.len() as u16).to_le_bytes());
        out.extend_from_slice(&(dir.len() as u32).to_le_bytes());
        out.extend_from_slice(&cd_offset.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out
    }

    /// Thousands of end markers claiming thousands of entries each: read once, refused fast.
    #[test]
    fn a_zip_crafted_with_many_end_markers_is_refused_in_linear_time() {
        let mut z = zip_with(&["a.xml"]);
        for _ in 0..50_000 {
            z.extend_from_slice(b"PK\x05\x06\x00\x00\x00\x00\xff\xff\xff\xff");
            z.extend_from_slice(&[0; 10]);
        }
        let started = std::time::Instant::now();
        assert_eq!(content_type(&z), None);
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn types_are_read_from_the_content() {
        assert_eq!(content_type(b"%PDF-1.7\n..."), Some("application/pdf"));
        assert_eq!(
            content_type(&[0xFF, 0xD8, 0xFF, 0xE0, 0]),
            Some("image/jpeg")
        );
        assert_eq!(
            content_type(&[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, 0]),
            Some("image/png")
        );
        assert_eq!(
            content_type(&zip_with(&["OFD.xml", "Doc_0/Document.xml"])),
            Some("application/ofd")
        );
        assert!(
            content_type(&zip_with(&["[Content_Types].xml", "word/document.xml"]))
                .is_some_and(|t| t.ends_with("wordprocessingml.document"))
        );
        // Disguised or other: an executable named .pdf, HTML, a ZIP of something else, a
        // truncated ZIP.
        assert_eq!(content_type(b"MZ\x90\x00"), None);
        assert_eq!(content_type(b"<html><script>"), None);
        assert_eq!(content_type(&zip_with(&["payload.exe"])), None);
        assert_eq!(content_type(b"PK\x03\x04\x00\x00"), None);
        assert_eq!(content_type(b""), None);
    }

    #[test]
    fn file_names_are_names() {
        assert_eq!(bad_file_name("整改报告.pdf"), None);
        assert!(bad_file_name("").is_some());
        assert!(bad_file_name("../etc/passwd").is_some());
        assert!(bad_file_name("a\\b.pdf").is_some());
        assert!(bad_file_name("a\0b.pdf").is_some());
        assert!(bad_file_name(&"x".repeat(201)).is_some());
    }
}

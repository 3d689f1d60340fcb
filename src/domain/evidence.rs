//! Evidence files (佐证材料): what a file is, read from its content, never from its name.

use std::io::Cursor;

/// The types a case's evidence may be: a scan or a photo of the rectification, or a document.
pub const ALLOWED: &str = "PDF, JPEG, PNG, OFD or DOCX";

/// The content type of `bytes`, if it is one the hub takes:
/// - PDF (`%PDF-`), JPEG (`FF D8 FF`), PNG (its 8-byte signature);
/// - OFD (GB/T 33190, a ZIP holding `OFD.xml`) and DOCX (a ZIP holding `word/document.xml`),
///   told apart by the ZIP's directory (read with the `zip` crate; nothing is unpacked).
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
        let archive = zip::ZipArchive::new(Cursor::new(bytes)).ok()?;
        let has = |name: &str| archive.file_names().any(|n| n.eq_ignore_ascii_case(name));
        if has("OFD.xml") {
            return Some("application/ofd");
        }
        if has("word/document.xml") && has("[Content_Types].xml") {
            return Some("application/vnd.openxmlformats-officedocument.wordprocessingml.document");
        }
    }
    None
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
    use std::io::Write;

    fn zip_with(names: &[&str]) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        let mut w = zip::ZipWriter::new(&mut out);
        for name in names {
            w.start_file(
                *name,
                zip::write::SimpleFileOptions::default()
                    .compression_method(zip::CompressionMethod::Stored),
            )
            .unwrap();
            w.write_all(b"<x/>").unwrap();
        }
        w.finish().unwrap();
        out.into_inner()
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

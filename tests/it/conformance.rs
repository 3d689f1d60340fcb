//! docs/policy-conformance.md stays true: every test it cites exists. An auditor checks the
//! hub against a policy text through that document; a renamed or deleted test must not leave
//! a rule pointing at nothing.

use std::path::Path;

/// The test paths cited in the document: backticked `a::b::c` names whose last part is a
/// function name (lower case, underscores).
fn cited(doc: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, part) in doc.split('`').enumerate() {
        if i % 2 == 0 {
            continue;
        }
        let segments: Vec<&str> = part.split("::").collect();
        let is_path = segments.len() >= 2
            && segments.iter().all(|s| {
                !s.is_empty()
                    && s.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            });
        if is_path {
            out.push(part.to_owned());
        }
    }
    out
}

/// Where a cited test lives: tests/it/<module>.rs for the integration suite, or for a unit test
/// (`…::tests::name`) the source file its module path names (src/a/b.rs or src/a/b/mod.rs).
fn file_of(root: &Path, path: &str) -> Option<std::path::PathBuf> {
    let segments: Vec<&str> = path.split("::").collect();
    // A unit test's path runs through its module's `tests`; an integration test's does not.
    if !segments.contains(&"tests") {
        let it = root.join("tests/it").join(format!("{}.rs", segments[0]));
        return it.exists().then_some(it);
    }
    let modules: Vec<&str> = segments[..segments.len() - 1]
        .iter()
        .copied()
        .filter(|s| *s != "tests")
        .collect();
    for n in (1..=modules.len()).rev() {
        let base = root.join("src").join(modules[..n].join("/"));
        for candidate in [base.with_extension("rs"), base.join("mod.rs")] {
            if candidate.exists() {
                return Some(candidate);
            }
        }
    }
    None
}

#[test]
fn every_test_the_policy_conformance_document_cites_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/policy-conformance.md"))
        .expect("docs/policy-conformance.md");
    let cited = cited(&doc);
    assert!(
        cited.len() >= 10,
        "the document cites {} tests: is the format still `module::test_name`?",
        cited.len()
    );
    let mut missing = Vec::new();
    for path in &cited {
        let name = path.rsplit("::").next().unwrap();
        let found = file_of(root, path)
            .and_then(|f| std::fs::read_to_string(f).ok())
            .is_some_and(|text| text.contains(&format!("fn {name}(")));
        if !found {
            missing.push(path.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "docs/policy-conformance.md cites tests that do not exist: {missing:#?}"
    );
}

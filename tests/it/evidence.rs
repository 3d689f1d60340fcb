//! Evidence of rectification (佐证材料, issue #18 part 2): upload, list and download through
//! RectificationService, byte for byte, on either backend; refused when too large, disguised,
//! out of scope, repeated or too late; nothing attached from an upload that did not finish.

use pb::rectification_service_client::RectificationServiceClient;
use rating_hub::pb::v1 as pb;
use tokio_stream::StreamExt;
use tonic::Code;

use crate::utils::*;

/// A PDF of `n` bytes: the signature, then bytes that do not repeat in short runs.
pub(crate) fn pdf(n: usize) -> Vec<u8> {
    let mut out = b"%PDF-1.7\n".to_vec();
    let mut x: u32 = 0x1234_5678;
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.push((x >> 24) as u8);
    }
    out
}

pub(crate) fn upload_messages(
    case_id: u64,
    name: &str,
    content: &[u8],
) -> Vec<pb::UploadEvidenceRequest> {
    use pb::upload_evidence_request::Part;
    let mut msgs = vec![pb::UploadEvidenceRequest {
        part: Some(Part::Header(pb::EvidenceHeader {
            case_id,
            file_name: name.into(),
        })),
    }];
    msgs.extend(content.chunks(1 << 20).map(|c| pb::UploadEvidenceRequest {
        part: Some(Part::Chunk(c.to_vec())),
    }));
    msgs
}

async fn bad_case(hub: &TestHub, key: &str) -> u64 {
    let mut r = rating(key);
    r.level = pb::Level::VeryDissatisfied as i32;
    r.text = "窗口人员态度恶劣".into();
    let id = submit_one(&mut hub.ingest().await, r).await.hub_id;
    RectificationServiceClient::new(hub.channel_as("tester").await)
        .list_cases(pb::ListCasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .cases
        .into_iter()
        .find(|c| c.hub_id == id)
        .unwrap()
        .id
}

async fn download(
    rect: &mut RectificationServiceClient<tonic::transport::Channel>,
    id: u64,
    sha256: &str,
) -> Result<(pb::EvidenceFile, Vec<u8>), tonic::Status> {
    use pb::download_evidence_response::Part;
    let mut stream = rect
        .download_evidence(pb::DownloadEvidenceRequest {
            id,
            sha256: sha256.into(),
        })
        .await?
        .into_inner();
    let mut file = None;
    let mut bytes = Vec::new();
    while let Some(m) = stream.next().await {
        match m?.part {
            Some(Part::File(f)) => file = Some(f),
            Some(Part::Chunk(c)) => bytes.extend(c),
            None => {}
        }
    }
    Ok((file.expect("the file's description first"), bytes))
}

#[tokio::test]
async fn evidence_round_trips_byte_for_byte_sealed_and_recorded() {
    let hub = TestHub::start().await;
    let case_id = bad_case(&hub, "ev-1").await;
    let mut rect = RectificationServiceClient::new(hub.channel_as("tester").await);
    let content = pdf(3 * (1 << 20) + 12_345);
    let answer = rect
        .upload_evidence(tokio_stream::iter(upload_messages(
            case_id,
            "整改报告.pdf",
            &content,
        )))
        .await
        .unwrap()
        .into_inner();
    let file = answer.file.unwrap();
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&content))
    };
    assert_eq!(file.sha256, sha);
    assert_eq!(file.content_type, "application/pdf");
    assert_eq!(file.size, content.len() as u64);
    assert_eq!(file.file_name, "整改报告.pdf");
    assert_eq!(file.attached_by, "tester");
    let last = answer.bad_rating_case.unwrap().history.pop().unwrap();
    assert_eq!(last.action, pb::CaseAction::Evidence as i32);
    assert_eq!(last.evidence_refs, [format!("sha256:{sha}")]);
    assert_eq!(last.note, "整改报告.pdf");

    let listed = rect
        .list_evidence(pb::ListEvidenceRequest { id: case_id })
        .await
        .unwrap()
        .into_inner()
        .files;
    assert_eq!(listed, std::slice::from_ref(&file));
    let (described, bytes) = download(&mut rect, case_id, &sha).await.unwrap();
    assert_eq!(described, file);
    assert!(
        bytes == content,
        "byte-identical ({} bytes back)",
        bytes.len()
    );
    // The download is audited.
    let audit = crate::security::AdminServiceClient::new(hub.channel_as("tester").await)
        .list_pii_access(pb::ListPiiAccessRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(
        audit
            .iter()
            .any(|a| a.rpc == "DownloadEvidence" && a.principal == "tester"),
        "{audit:?}"
    );
    // Sealed at rest: the file's bytes are nowhere in the SQLite database.
    if !crate::pg::enabled() {
        let db = std::fs::read(hub.dir.path().join("hub.db")).unwrap();
        let wal = std::fs::read(hub.dir.path().join("hub.db-wal")).unwrap_or_default();
        let probe = &content[4096..4096 + 64];
        for f in [&db, &wal] {
            assert!(
                !f.windows(64).any(|w| w == probe),
                "plain evidence in the database"
            );
        }
    }
    // And it survives a restart, still whole.
    let hub = hub.stop().await.restart().await;
    let mut rect = RectificationServiceClient::new(hub.channel_as("tester").await);
    let (_, again) = download(&mut rect, case_id, &sha).await.unwrap();
    assert!(again == content);
    hub.stop().await;
}

#[tokio::test]
async fn oversized_disguised_repeated_late_and_out_of_scope_uploads_are_refused() {
    let hub = HubBuilder::new()
        .set("limits.evidence_max_mb", "1")
        .principal("other-org", &["rectify"], TestScope::Orgs(&[org(2)]))
        .start()
        .await;
    let case_id = bad_case(&hub, "ev-2").await;
    let mut rect = RectificationServiceClient::new(hub.channel_as("tester").await);
    let send = |rect: &mut RectificationServiceClient<tonic::transport::Channel>,
                msgs: Vec<pb::UploadEvidenceRequest>| {
        let mut rect = rect.clone();
        async move { rect.upload_evidence(tokio_stream::iter(msgs)).await }
    };
    let fields = |s: &tonic::Status| bad_request_fields(s);

    let big = send(
        &mut rect,
        upload_messages(case_id, "big.pdf", &pdf(2 << 20)),
    )
    .await;
    let big = big.unwrap_err();
    assert_eq!(big.code(), Code::InvalidArgument);
    assert_eq!(fields(&big), ["chunk"], "{big:?}");
    assert!(big.message().contains("larger than 1 MB"), "{big:?}");

    let mut exe = b"MZ\x90\x00\x03".to_vec();
    exe.extend(pdf(1000));
    let disguised = send(&mut rect, upload_messages(case_id, "报告.pdf", &exe))
        .await
        .unwrap_err();
    assert_eq!(disguised.code(), Code::InvalidArgument);
    assert!(
        disguised
            .message()
            .contains("not PDF, JPEG, PNG, OFD or DOCX"),
        "{disguised:?}"
    );

    let no_header = send(
        &mut rect,
        upload_messages(case_id, "x.pdf", &pdf(10))[1..].to_vec(),
    )
    .await
    .unwrap_err();
    assert_eq!(fields(&no_header), ["header"]);
    let path = send(&mut rect, upload_messages(case_id, "../x.pdf", &pdf(10)))
        .await
        .unwrap_err();
    assert_eq!(fields(&path), ["header.file_name"]);

    let other = RectificationServiceClient::new(hub.channel_as("other-org").await);
    let mut other2 = other.clone();
    let denied = other2
        .upload_evidence(tokio_stream::iter(upload_messages(
            case_id,
            "a.pdf",
            &pdf(100),
        )))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    let small = pdf(5000);
    send(&mut rect, upload_messages(case_id, "a.pdf", &small))
        .await
        .unwrap();
    // The same upload sent again (its answer lost): the same answer, nothing added.
    let resent = send(&mut rect, upload_messages(case_id, "a.pdf", &small))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resent.file.unwrap().file_name, "a.pdf");
    // A name carrying an ID or a phone number is kept without it.
    let named = send(
        &mut rect,
        upload_messages(case_id, "张三_13912345678.pdf", &pdf(6000)),
    )
    .await
    .unwrap()
    .into_inner();
    let kept = named.file.unwrap().file_name;
    assert!(!kept.contains("13912345678"), "{kept}");
    assert!(
        named
            .bad_rating_case
            .unwrap()
            .history
            .iter()
            .all(|e| !e.note.contains("13912345678")),
        "the history step's note"
    );
    let twice = send(&mut rect, upload_messages(case_id, "a-again.pdf", &small))
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::AlreadyExists, "{twice:?}");
    // Nothing of the refused ones was attached; a stranger cannot list or download.
    let listed = rect
        .list_evidence(pb::ListEvidenceRequest { id: case_id })
        .await
        .unwrap()
        .into_inner()
        .files;
    assert_eq!(listed.len(), 2, "{listed:?}");
    let mut other3 = other.clone();
    assert_eq!(
        download(&mut other3, case_id, &listed[0].sha256)
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    // An archived case takes no more files.
    let step = |action: pb::CaseAction, refs: &[&str]| pb::RecordActionRequest {
        id: case_id,
        action: action as i32,
        note: "记录".into(),
        evidence_refs: refs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    for (a, refs) in [
        (pb::CaseAction::Contact, &[][..]),
        (pb::CaseAction::Rectify, &[listed[0].sha256.as_str()][..]),
        (pb::CaseAction::FeedBack, &[][..]),
        (pb::CaseAction::Callback, &[][..]),
        (pb::CaseAction::Archive, &[][..]),
    ] {
        rect.record_action(step(a, refs)).await.unwrap();
    }
    let late = send(&mut rect, upload_messages(case_id, "late.pdf", &pdf(7000)))
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");
    assert!(late.message().contains("archived"), "{late:?}");
    hub.stop().await;
}

/// A hub killed (SIGKILL) in the middle of an upload has nothing attached after its restart:
/// a file is attached in one transaction with its history step, only once all of it arrived.
#[tokio::test]
async fn a_kill_during_an_upload_leaves_no_half_file_attached() {
    use crate::binary::{SpawnedHub, dev_admin_channel, signal, spawn_hub_with, wait_exit};
    let dir = tempfile::tempdir().unwrap();
    let SpawnedHub {
        mut child,
        url,
        logs,
        ..
    } = spawn_hub_with(dir.path(), "info", &[]);
    let channel = dev_admin_channel(dir.path(), &url).await;
    let mut r = rating("ev-kill");
    r.level = pb::Level::Dissatisfied as i32;
    r.text = "等候时间过长".into();
    let id = submit_one(
        &mut pb::ingest_service_client::IngestServiceClient::new(channel.clone()),
        r,
    )
    .await
    .hub_id;
    let mut rect = RectificationServiceClient::new(channel);
    let case_id = rect
        .list_cases(pb::ListCasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .cases
        .into_iter()
        .find(|c| c.hub_id == id)
        .unwrap()
        .id;
    // The header and half the file sent; the rest never comes.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let content = pdf(2 << 20);
    let msgs = upload_messages(case_id, "half.pdf", &content);
    tx.send(msgs[0].clone()).await.unwrap();
    tx.send(msgs[1].clone()).await.unwrap();
    let upload = tokio::spawn({
        let mut rect = rect.clone();
        async move {
            rect.upload_evidence(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        }
    });
    // The hub is inside the upload (it took the header) when it is killed. (The log is read
    // on a thread of its own: a blocking wait here would stall this test's runtime, and the
    // upload with it.)
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let line = logs
                .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
                .expect("the hub says the upload started");
            if line.contains("Evidence upload started.") {
                break;
            }
        }
    })
    .await
    .unwrap();
    signal(&child, "KILL");
    let killed = tokio::task::spawn_blocking(move || wait_exit(&mut child))
        .await
        .unwrap();
    assert!(!killed.success());
    assert!(
        upload.await.unwrap().is_err(),
        "the upload did not complete"
    );
    drop(tx);

    let SpawnedHub { mut child, url, .. } = spawn_hub_with(dir.path(), "info", &[]);
    let mut rect = RectificationServiceClient::new(dev_admin_channel(dir.path(), &url).await);
    let files = rect
        .list_evidence(pb::ListEvidenceRequest { id: case_id })
        .await
        .unwrap()
        .into_inner()
        .files;
    assert!(files.is_empty(), "{files:?}");
    let case = rect
        .get_case(pb::GetCaseRequest { id: case_id })
        .await
        .unwrap()
        .into_inner()
        .bad_rating_case
        .unwrap();
    assert!(
        case.history
            .iter()
            .all(|e| e.action != pb::CaseAction::Evidence as i32),
        "{:?}",
        case.history
    );
    crate::binary::sigterm(&child);
    tokio::task::spawn_blocking(move || wait_exit(&mut child))
        .await
        .unwrap();
}

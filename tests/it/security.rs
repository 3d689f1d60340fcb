//! mTLS identities, authorization, revocation, quotas and load shedding, over real TLS
//! connections to a real hub.

use std::time::Duration;

use rating_hub::pb::v1 as pb;
use rating_hub::pki;
use tonic::Code;
use tonic_types::StatusExt;

use crate::ingest::count;
use crate::utils::*;

pub use pb::admin_service_client::AdminServiceClient;

async fn submit_as(
    hub: &TestHub,
    name: &str,
    r: pb::Rating,
) -> Result<pb::ItemResult, tonic::Status> {
    let mut client = IngestServiceClient::new(hub.channel_as(name).await);
    client
        .submit_ratings(pb::SubmitRatingsRequest { ratings: vec![r] })
        .await
        .map(|resp| resp.into_inner().results.remove(0))
}

/// A connection that presents `identity` (or none) and tries one SubmitRatings.
async fn try_submit_with(hub: &TestHub, identity: Option<&pki::IssuedPair>) -> Result<(), String> {
    let channel = hub
        .endpoint(identity)
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    IngestServiceClient::new(channel)
        .submit_ratings(pb::SubmitRatingsRequest {
            ratings: vec![rating("tls-probe")],
        })
        .await
        .map(|_| ())
        .map_err(|s| format!("rpc: {s}"))
}

/// The call failed in the TLS layer (the handshake, or the connection it ended), never as
/// an answer of the hub's own: a PERMISSION_DENIED or UNAUTHENTICATED would mean the
/// certificate got through the handshake.
fn assert_refused_in_tls(result: Result<(), String>) -> String {
    let err = result.expect_err("the certificate must be refused");
    assert!(
        !err.contains("PermissionDenied") && !err.contains("Unauthenticated"),
        "refused by the application, not by TLS: {err}"
    );
    assert!(
        err.starts_with("connect:") || err.contains("transport") || err.contains("Unavailable"),
        "not a TLS failure: {err}"
    );
    err
}

/// New connections with `pair` are refused in TLS within `limit`.
async fn refused_within(hub: &TestHub, pair: &pki::IssuedPair, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let result = try_submit_with(hub, Some(pair)).await;
        if result.is_err() {
            assert_refused_in_tls(result);
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still admitted after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn no_client_certificate_is_refused() {
    let hub = TestHub::start().await;
    assert_refused_in_tls(try_submit_with(&hub, None).await);
    assert_eq!(count(&hub).await, 0);
    hub.stop().await;
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused_even_with_a_registered_name() {
    let hub = TestHub::start().await;
    let other = tempfile::tempdir().unwrap();
    pki::create_ca(other.path(), "some other CA").unwrap();
    let impostor = pki::issue_client(other.path(), "tester", pki::Validity::days(5)).unwrap();
    assert_refused_in_tls(try_submit_with(&hub, Some(&impostor)).await);
    assert_eq!(count(&hub).await, 0);
    hub.stop().await;
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let hub = HubBuilder::new()
        .principal("old-dept", &["submit"], TestScope::National)
        .start()
        .await;
    let now = time::OffsetDateTime::now_utc();
    let expired = pki::issue_client(
        &hub.pki_dir(),
        "old-dept",
        pki::Validity {
            not_before: now - time::Duration::days(30),
            not_after: now - time::Duration::days(1),
        },
    )
    .unwrap();
    assert_refused_in_tls(try_submit_with(&hub, Some(&expired)).await);
    assert_eq!(count(&hub).await, 0);
    hub.stop().await;
}

#[tokio::test]
async fn revoked_certificate_is_refused_without_a_restart() {
    let hub = HubBuilder::new()
        .principal("dept", &["submit"], TestScope::National)
        .start()
        .await;
    let dept = hub.client_files("dept");
    try_submit_with(&hub, Some(&dept))
        .await
        .expect("accepted before revocation");
    pki::revoke_client(&hub.pki_dir(), "dept").unwrap();
    // The CRL watcher reads the file within a second, off the handshake path.
    refused_within(&hub, &dept, Duration::from_secs(10)).await;
    // Others are unaffected.
    let tester = hub.client_files("tester");
    try_submit_with(&hub, Some(&tester))
        .await
        .expect("tester still admitted");
    hub.stop().await;
}

#[tokio::test]
async fn unregistered_principal_is_denied_by_name() {
    let hub = TestHub::start().await;
    let err = submit_as(&hub, "stranger", rating("x")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("stranger"), "{}", err.message());
    assert_eq!(count(&hub).await, 0);
    hub.stop().await;
}

/// The actions of the matrix, one per RPC family and scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    SubmitInScope,
    SubmitOutOfScope,
    ReportCaseInScope,
    GetInScope,
    GetOutOfScope,
    ListInScope,
    ListOutOfScope,
    StatsInScope,
    PullInScope,
    ReconcileInScope,
    AdminAudit,
    AdminUpstreams,
    CasesInScope,
}

/// What happened: OK, or the status code (an item refused for scope counts as PermissionDenied).
async fn attempt(hub: &TestHub, who: &str, action: Action, ids: &(String, String)) -> Code {
    let channel = hub.channel_as(who).await;
    let mut ingest = IngestServiceClient::new(channel.clone());
    let mut query = QueryServiceClient::new(channel.clone());
    let mut admin = AdminServiceClient::new(channel.clone());
    let mut sync = crate::relay::SyncServiceClient::new(channel.clone());
    let mut cases = pb::rectification_service_client::RectificationServiceClient::new(channel);
    let in_scope = || {
        let mut r = rating(&format!("{who}-{action:?}"));
        r.org_credit_code = org(1);
        r
    };
    let out_scope = || {
        let mut r = rating(&format!("{who}-{action:?}"));
        r.org_credit_code = org(2);
        r.region_code = "440103".into();
        r
    };
    let item_code = |r: Result<tonic::Response<pb::SubmitRatingsResponse>, tonic::Status>| match r {
        Err(s) => s.code(),
        Ok(resp) => match pb::Outcome::try_from(resp.into_inner().results[0].outcome).unwrap() {
            pb::Outcome::Accepted => Code::Ok,
            pb::Outcome::PermissionDenied => Code::PermissionDenied,
            other => panic!("unexpected outcome {other:?}"),
        },
    };
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    match action {
        Action::SubmitInScope => item_code(
            ingest
                .submit_ratings(pb::SubmitRatingsRequest {
                    ratings: vec![in_scope()],
                })
                .await,
        ),
        Action::SubmitOutOfScope => item_code(
            ingest
                .submit_ratings(pb::SubmitRatingsRequest {
                    ratings: vec![out_scope()],
                })
                .await,
        ),
        Action::ReportCaseInScope => code(
            ingest
                .report_service_cases(pb::ReportServiceCasesRequest {
                    cases: vec![pb::ServiceCase {
                        case_number: format!("C-{who}"),
                        event: pb::CaseEvent::Completed as i32,
                        occurred_at: Some(now()),
                        item_code: "I".into(),
                        region_code: "530102".into(),
                        org_credit_code: org(1),
                        ..Default::default()
                    }],
                })
                .await
                .map(|r| {
                    assert_eq!(
                        r.into_inner().results[0].outcome,
                        pb::Outcome::Accepted as i32
                    )
                }),
        ),
        Action::GetInScope => code(
            query
                .get_rating(pb::GetRatingRequest {
                    hub_id: ids.0.clone(),
                })
                .await
                .map(drop),
        ),
        Action::GetOutOfScope => code(
            query
                .get_rating(pb::GetRatingRequest {
                    hub_id: ids.1.clone(),
                })
                .await
                .map(drop),
        ),
        Action::ListInScope => code(
            query
                .list_ratings(pb::ListRatingsRequest::default())
                .await
                .map(|r| {
                    let ratings = r.into_inner().ratings;
                    assert!(!ratings.is_empty());
                    assert!(
                        ratings.iter().all(|x| x.org_credit_code == org(1)),
                        "{who} sees only its scope"
                    );
                }),
        ),
        Action::ListOutOfScope => code(
            query
                .list_ratings(pb::ListRatingsRequest {
                    filter: Some(pb::RatingFilter {
                        org_credit_code: org(2),
                        region_code_prefix: "44".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        Action::StatsInScope => code(
            query
                .get_stats(pb::GetStatsRequest {
                    filter: None,
                    group_by: vec![pb::StatsDimension::Organization as i32],
                    ..Default::default()
                })
                .await
                .map(|r| {
                    let keys: Vec<_> = r.into_inner().groups.into_iter().map(|g| g.key).collect();
                    assert_eq!(keys, [[org(1)]], "{who}: only its scope is counted");
                }),
        ),
        Action::AdminAudit => code(
            admin
                .list_pii_access(pb::ListPiiAccessRequest::default())
                .await
                .map(drop),
        ),
        Action::CasesInScope => code(cases.list_cases(pb::ListCasesRequest::default()).await.map(
            |r| {
                let orgs: Vec<_> = r
                    .into_inner()
                    .cases
                    .into_iter()
                    .map(|c| c.org_credit_code)
                    .collect();
                assert!(!orgs.is_empty(), "{who} sees its organisation's case");
                assert!(
                    orgs.iter().all(|o| *o == org(1)),
                    "{who} sees only its scope"
                );
            },
        )),
        Action::AdminUpstreams => code(
            admin
                .list_upstreams(pb::ListUpstreamsRequest {})
                .await
                .map(drop),
        ),
        Action::PullInScope => code(sync.pull(pb::PullRequest::default()).await.map(|r| {
            let ratings = r.into_inner().ratings;
            assert!(!ratings.is_empty());
            assert!(
                ratings.iter().all(|x| x.org_credit_code == org(1)),
                "{who} pulls only its scope"
            );
        })),
        Action::ReconcileInScope => code(
            sync.reconcile(pb::ReconcileRequest {
                rated_from: Some(ts(now().seconds - 86_400)),
                rated_until: Some(ts(now().seconds + 86_400)),
                ..Default::default()
            })
            .await
            .map(|r| {
                let orgs: Vec<_> = r
                    .into_inner()
                    .entries
                    .into_iter()
                    .map(|e| e.org_credit_code)
                    .collect();
                assert_eq!(orgs, [org(1)], "{who} reconciles only its scope");
            }),
        ),
    }
}

#[tokio::test]
async fn role_and_scope_matrix_over_every_rpc_family() {
    let orgs1 = [org(1)];
    let hub = HubBuilder::new()
        .principal("dept-submit", &["submit"], TestScope::Orgs(&orgs1))
        .principal("dept-read", &["read"], TestScope::Orgs(&orgs1))
        .principal("city-read", &["read"], TestScope::Regions(&["5301"]))
        .principal("dept-pull", &["pull"], TestScope::Orgs(&orgs1))
        .principal("dept-pii", &["read", "read-pii"], TestScope::Orgs(&orgs1))
        .principal("dept-rectify", &["rectify"], TestScope::Orgs(&orgs1))
        .principal("operator", &["admin"], TestScope::National)
        .principal("no-roles", &[], TestScope::National)
        .start()
        .await;
    // One rating in scope (org 1, Kunming) and one outside (org 2, Guangzhou).
    let mut ingest = hub.ingest().await;
    let a = submit_one(&mut ingest, {
        let mut r = rating("seed-a");
        r.org_credit_code = org(1);
        // 差评, so each organisation also has a bad-rating case.
        r.level = pb::Level::Dissatisfied as i32;
        r.text = "排队太久".into();
        r
    })
    .await;
    let b = submit_one(&mut ingest, {
        let mut r = rating("seed-b");
        r.org_credit_code = org(2);
        r.level = pb::Level::Dissatisfied as i32;
        r.text = "排队太久".into();
        r.region_code = "440103".into();
        r
    })
    .await;
    let ids = (a.hub_id, b.hub_id);

    use Action::*;
    use Code::{Ok as OK, PermissionDenied as PD};
    let expected: &[(&str, &[(Action, Code)])] = &[
        (
            "dept-submit",
            &[
                (SubmitInScope, OK),
                (SubmitOutOfScope, PD),
                (ReportCaseInScope, OK),
                (GetInScope, PD),
                (ListInScope, PD),
                (StatsInScope, PD),
                (PullInScope, PD),
                (AdminAudit, PD),
                (CasesInScope, PD),
            ],
        ),
        (
            "dept-read",
            &[
                (SubmitInScope, PD),
                (ReportCaseInScope, PD),
                (GetInScope, OK),
                (GetOutOfScope, PD),
                (ListInScope, OK),
                (ListOutOfScope, PD),
                (StatsInScope, OK),
                (PullInScope, PD),
                (ReconcileInScope, PD),
                (AdminAudit, PD),
                (AdminUpstreams, PD),
                (CasesInScope, PD),
            ],
        ),
        (
            "dept-pull",
            &[
                (SubmitInScope, PD),
                (GetInScope, PD),
                (ListInScope, PD),
                (PullInScope, OK),
                (ReconcileInScope, OK),
                (AdminAudit, PD),
                (CasesInScope, PD),
            ],
        ),
        (
            "dept-pii",
            &[
                (SubmitInScope, PD),
                (GetInScope, OK),
                (GetOutOfScope, PD),
                (ListInScope, OK),
                (ListOutOfScope, PD),
                (PullInScope, PD),
                (AdminAudit, PD),
                (CasesInScope, PD),
            ],
        ),
        (
            "dept-rectify",
            &[
                (SubmitInScope, PD),
                (GetInScope, PD),
                (ListInScope, PD),
                (PullInScope, PD),
                (AdminAudit, PD),
                (CasesInScope, OK),
            ],
        ),
        (
            "city-read",
            &[
                (SubmitInScope, PD),
                (GetInScope, OK),
                (GetOutOfScope, PD),
                (ListInScope, OK),
                (ListOutOfScope, PD),
                (StatsInScope, OK),
                (AdminAudit, PD),
                (CasesInScope, PD),
            ],
        ),
        (
            "operator",
            &[
                (SubmitInScope, PD),
                (GetInScope, PD),
                (ListInScope, PD),
                (PullInScope, PD),
                (AdminAudit, OK),
                (AdminUpstreams, OK),
                (CasesInScope, PD),
            ],
        ),
        (
            "no-roles",
            &[
                (SubmitInScope, PD),
                (ReportCaseInScope, PD),
                (GetInScope, PD),
                (ListInScope, PD),
                (StatsInScope, PD),
                (PullInScope, PD),
                (ReconcileInScope, PD),
                (AdminAudit, PD),
                (AdminUpstreams, PD),
                (CasesInScope, PD),
            ],
        ),
    ];
    let mut mismatches = Vec::new();
    for (who, cases) in expected {
        for (action, want) in cases.iter() {
            let got = attempt(&hub, who, *action, &ids).await;
            if got != *want {
                mismatches.push(format!("{who} {action:?}: want {want:?}, got {got:?}"));
            }
        }
    }
    assert!(mismatches.is_empty(), "{mismatches:#?}");
    hub.stop().await;
}

#[tokio::test]
async fn denial_names_the_missing_role() {
    let hub = HubBuilder::new()
        .principal("reader", &["read"], TestScope::National)
        .start()
        .await;
    let err = submit_as(&hub, "reader", rating("x")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("submit") && err.message().contains("reader"),
        "{}",
        err.message()
    );
    hub.stop().await;
}

#[tokio::test]
async fn request_quota_exceeded_then_recovered_after_the_retry_delay() {
    let hub = HubBuilder::new()
        .principal("limited", &["submit"], TestScope::National)
        .set("principals.limited.requests_per_sec", "2")
        .set("principals.limited.requests_burst", "1")
        .start()
        .await;
    let mut client = IngestServiceClient::new(hub.channel_as("limited").await);
    let call = |key: &str| pb::SubmitRatingsRequest {
        ratings: vec![rating(key)],
    };
    // The first call spends the burst without a commit (an empty batch is refused at once),
    // so nothing slow (an fsync on a loaded machine) stands between it and the second, which
    // must come within the quota's half second to be refused.
    let first = client
        .submit_ratings(pb::SubmitRatingsRequest { ratings: vec![] })
        .await
        .unwrap_err();
    assert_eq!(
        first.code(),
        Code::InvalidArgument,
        "admitted, then refused as empty"
    );
    let err = client.submit_ratings(call("q2")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let delay = err
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("google.rpc.RetryInfo with a delay");
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_millis(500),
        "{delay:?}"
    );
    // Waiting the advertised delay is what the client is told to do; then it is admitted.
    tokio::time::sleep(delay).await;
    client
        .submit_ratings(call("q3"))
        .await
        .expect("recovered after the retry delay");
    assert_eq!(count(&hub).await, 1);
    hub.stop().await;
}

#[tokio::test]
async fn a_batch_larger_than_the_rating_burst_is_refused_and_named() {
    let hub = HubBuilder::new()
        .principal("small", &["submit"], TestScope::National)
        .set("principals.small.ratings_burst", "5")
        .start()
        .await;
    let mut client = IngestServiceClient::new(hub.channel_as("small").await);
    let err = client
        .submit_ratings(pb::SubmitRatingsRequest {
            ratings: (0..6).map(|i| rating(&format!("b{i}"))).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_request_fields(&err), ["ratings"]);
    assert_eq!(count(&hub).await, 0);
    hub.stop().await;
}

#[tokio::test]
async fn overload_is_shed_with_unavailable_not_queued() {
    use tokio_stream::StreamExt;
    let hub = TestHub::builder_max_in_flight(1).await;
    // An open stream holds the only slot.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut ingest = hub.ingest().await;
    let mut acks = ingest
        .stream_ratings(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(pb::StreamRatingsRequest {
        rating: Some(rating("holder")),
    })
    .await
    .unwrap();
    acks.next().await.unwrap().unwrap();
    let err = hub
        .query()
        .await
        .get_stats(pb::GetStatsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("overloaded"), "{}", err.message());
    drop(tx);
    while acks.next().await.is_some() {}
    hub.stop().await;
}

/// A configured CRL that is missing or holds no CRL stops the start (before, it was skipped
/// and revoked nothing); one that disappears while the hub runs keeps the last good lists
/// (before, every revocation was lifted).
#[tokio::test]
async fn a_missing_or_empty_crl_stops_the_start_and_a_deleted_one_keeps_its_revocations() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.pem");
    let err = HubBuilder::new()
        .set(
            "tls.crl_files",
            &format!("[{:?}]", missing.display().to_string()),
        )
        .try_start()
        .await
        .err()
        .expect("a hub with a missing CRL must not start");
    assert!(format!("{err:#}").contains("nowhere.pem"), "{err:#}");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let err = HubBuilder::new()
        .set(
            "tls.crl_files",
            &format!("[{:?}]", empty.display().to_string()),
        )
        .try_start()
        .await
        .err()
        .expect("a hub with an empty CRL file must not start");
    assert!(
        format!("{err:#}").contains("holds no certificate revocation list"),
        "{err:#}"
    );

    let hub = HubBuilder::new()
        .principal("dept", &["submit"], TestScope::National)
        .start()
        .await;
    let dept = hub.client_files("dept");
    pki::revoke_client(&hub.pki_dir(), "dept").unwrap();
    refused_within(&hub, &dept, Duration::from_secs(10)).await;
    std::fs::remove_file(hub.pki_dir().join(pki::CRL)).unwrap();
    // Several watcher rounds (one a second) later, still refused.
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        assert_refused_in_tls(try_submit_with(&hub, Some(&dept)).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    hub.stop().await;
}

/// A CRL in DER form (as many CAs publish it) is read like a PEM one; before, it yielded no
/// PEM section and revoked nothing.
#[tokio::test]
async fn a_der_crl_revokes() {
    let hub_dir = tempfile::tempdir().unwrap();
    let pki_dir = hub_dir.path().join("pki");
    pki::create_ca(&pki_dir, "rating-hub test CA").unwrap();
    pki::issue_server(
        &pki_dir,
        &["localhost", "127.0.0.1"],
        pki::Validity::days(30),
    )
    .unwrap();
    let dept = pki::issue_client(&pki_dir, "dept", pki::Validity::days(5)).unwrap();
    pki::revoke_client(&pki_dir, "dept").unwrap();
    let pem = std::fs::read(pki_dir.join(pki::CRL)).unwrap();
    let (_, block) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let der = hub_dir.path().join("crl.der");
    std::fs::write(&der, &block.contents).unwrap();
    let hub = HubBuilder::new()
        .principal("dept", &["submit"], TestScope::National)
        .set(
            "tls.crl_files",
            &format!("[{:?}]", der.display().to_string()),
        )
        .start_in_dir(hub_dir)
        .await;
    assert_refused_in_tls(try_submit_with(&hub, Some(&dept)).await);
    try_submit_with(&hub, Some(&hub.client_files("tester")))
        .await
        .expect("the CRL revokes only dept");
    hub.stop().await;
}

/// Root → intermediate → client, with only the intermediate's CRL configured (the one that
/// can list the client): clients are admitted, and a client the intermediate revokes is
/// refused. Before, webpki checked the intermediate against the root's CRL too, found no
/// such CRL, and refused every client.
#[tokio::test]
async fn a_two_tier_pki_needs_only_the_issuing_cas_crl() {
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, IsCa, Issuer,
        KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams, SerialNumber,
    };
    let dir = tempfile::tempdir().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let ca_params = |cn: &str| {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(30);
        p.use_authority_key_identifier_extension = true;
        p
    };
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca_params("test root CA");
    let root = root_params.clone().self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, root_key);
    let mid_key = KeyPair::generate().unwrap();
    let mid_params = ca_params("test issuing CA");
    let mid = mid_params
        .clone()
        .signed_by(&mid_key, &root_issuer)
        .unwrap();
    let mid_issuer = Issuer::new(mid_params, mid_key);
    let client = |cn: &str, serial: u8| {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(5);
        p.serial_number = Some(SerialNumber::from_slice(&[serial]));
        p.use_authority_key_identifier_extension = true;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &mid_issuer).unwrap();
        let pair = pki::IssuedPair {
            cert: dir.path().join(format!("{cn}.pem")),
            key: dir.path().join(format!("{cn}.key")),
        };
        // The client presents its chain: its certificate, then the issuing CA's.
        std::fs::write(&pair.cert, cert.pem() + &mid.pem()).unwrap();
        std::fs::write(&pair.key, key.serialize_pem()).unwrap();
        pair
    };
    let crl = |revoked: &[u8]| {
        let params = CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(5),
            next_update: now + time::Duration::days(30),
            crl_number: SerialNumber::from_slice(&[revoked.len() as u8 + 1]),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&[*s]),
                    revocation_time: now,
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&mid_issuer).unwrap().pem().unwrap()
    };
    let (a, b) = (client("dept-a", 10), client("dept-b", 11));
    let root_file = dir.path().join("root.pem");
    std::fs::write(&root_file, root.pem()).unwrap();
    let crl_file = dir.path().join("issuing-ca.crl");
    pki::write_atomic(&crl_file, &crl(&[])).unwrap();
    let hub = HubBuilder::new()
        .principal("dept-a", &["submit"], TestScope::National)
        .principal("dept-b", &["submit"], TestScope::National)
        .set(
            "tls.client_ca",
            &format!("{:?}", root_file.display().to_string()),
        )
        .set(
            "tls.crl_files",
            &format!("[{:?}]", crl_file.display().to_string()),
        )
        .start()
        .await;
    try_submit_with(&hub, Some(&a))
        .await
        .expect("dept-a admitted");
    try_submit_with(&hub, Some(&b))
        .await
        .expect("dept-b admitted");
    pki::write_atomic(&crl_file, &crl(&[11])).unwrap();
    refused_within(&hub, &b, Duration::from_secs(10)).await;
    try_submit_with(&hub, Some(&a))
        .await
        .expect("dept-a still admitted");
    hub.stop().await;
}

/// Issue #20: a reload puts principals in force on the next call — one added can call, one
/// removed is refused — while a stream opened before it stays open; a file that does not load
/// is refused with the reason, and the running principals stay.
#[tokio::test]
async fn a_reload_puts_principals_in_force_while_a_stream_stays_open() {
    use tokio_stream::StreamExt;
    let hub = HubBuilder::new()
        .principal("leaving", &["submit"], TestScope::National)
        .start()
        .await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut acks = hub
        .ingest()
        .await
        .stream_ratings(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let send = |key: &str| pb::StreamRatingsRequest {
        rating: Some(rating(key)),
    };
    tx.send(send("before")).await.unwrap();
    let ack = acks.next().await.unwrap().unwrap().result.unwrap();
    assert_eq!(outcome(&ack), pb::Outcome::Accepted);
    let leaving = || async { IngestServiceClient::new(hub.channel_as("leaving").await) };
    submit_one(&mut leaving().await, rating("l-1")).await;

    // The file changes: "leaving" goes, "arriving" comes.
    let path = hub.dir.path().join("hub.toml");
    let mut t: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let principals = t["principals"].as_table_mut().unwrap();
    principals.remove("leaving");
    principals.insert(
        "arriving".into(),
        toml::Value::Table(toml::from_str("roles = [\"submit\"]\nall_regions = true").unwrap()),
    );
    std::fs::write(&path, toml::to_string(&t).unwrap()).unwrap();
    let mut admin = AdminServiceClient::new(hub.channel_as("tester").await);
    let r = admin
        .reload_config(pb::ReloadConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.added, r.removed),
        (vec!["arriving".to_string()], vec!["leaving".to_string()])
    );
    let mut arriving = IngestServiceClient::new(hub.channel_as("arriving").await);
    assert_eq!(
        outcome(&submit_one(&mut arriving, rating("a-1")).await),
        pb::Outcome::Accepted
    );
    let err = leaving()
        .await
        .submit_ratings(pb::SubmitRatingsRequest {
            ratings: vec![rating("l-2")],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    // The stream opened before the reload goes on.
    tx.send(send("after")).await.unwrap();
    let ack = acks.next().await.unwrap().unwrap().result.unwrap();
    assert_eq!(outcome(&ack), pb::Outcome::Accepted);

    // A broken file: refused with the reason; the running principals stay.
    std::fs::write(&path, "[principals.oops\nroles = ").unwrap();
    let err = admin
        .reload_config(pb::ReloadConfigRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("hub.toml"), "{err:?}");
    assert_eq!(
        outcome(&submit_one(&mut arriving, rating("a-2")).await),
        pb::Outcome::Accepted
    );
    // A file that turns on the development PKI (and so its all-powerful admin) under the
    // running CA: refused, TLS changes need a restart.
    let mut dev = t.clone();
    dev["tls"]
        .as_table_mut()
        .unwrap()
        .insert("dev_pki".into(), toml::Value::Boolean(true));
    std::fs::write(&path, toml::to_string(&dev).unwrap()).unwrap();
    let err = admin
        .reload_config(pb::ReloadConfigRequest {})
        .await
        .unwrap_err();
    assert!(
        err.message().contains("TLS changes need a restart"),
        "{err:?}"
    );
    // A file that loads but does not validate: refused too.
    t["principals"].as_table_mut().unwrap().insert(
        "bad name!".into(),
        toml::Value::Table(toml::from_str("roles = [\"submit\"]").unwrap()),
    );
    std::fs::write(&path, toml::to_string(&t).unwrap()).unwrap();
    let err = admin
        .reload_config(pb::ReloadConfigRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    drop(tx);
    hub.stop().await;
}

/// Issue #20: `limits.max_in_flight` changes on reload. Lowered while calls hold every slot,
/// those calls go on and the slots they free are retired until the new limit holds; raised,
/// the new slots serve the next call at once.
#[tokio::test]
async fn a_reload_changes_the_calls_in_flight_limit_without_cutting_calls() {
    let hub = TestHub::builder_max_in_flight(3).await;
    let path = hub.dir.path().join("hub.toml");
    let set_limit = |n: i64| {
        let mut t: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        t["limits"]
            .as_table_mut()
            .unwrap()
            .insert("max_in_flight".into(), toml::Value::Integer(n));
        std::fs::write(&path, toml::to_string(&t).unwrap()).unwrap();
    };
    // A stream holds its slot while it is open.
    let open = || async {
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::StreamRatingsRequest>(1);
        let acks = hub
            .ingest()
            .await
            .stream_ratings(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        (tx, acks)
    };
    let unary = || async {
        hub.ingest()
            .await
            .submit_ratings(pb::SubmitRatingsRequest {
                ratings: vec![rating(&uuid::Uuid::now_v7().to_string())],
            })
            .await
            .map(|_| ())
            .map_err(|s| s.code())
    };
    let reload = || async {
        AdminServiceClient::new(hub.channel_as("tester").await)
            .reload_config(pb::ReloadConfigRequest {})
            .await
            .unwrap()
            .into_inner()
    };
    let a = open().await;
    let b = open().await;
    set_limit(2);
    assert_eq!(reload().await.limits_changed, ["limits.max_in_flight"]);
    // The reload's own slot, freed, is retired: a and b hold the two left.
    crate::fake_upstream::eventually(Duration::from_secs(10), "a call to be shed", || async {
        unary().await == Err(Code::Unavailable)
    })
    .await;
    drop(b);
    crate::fake_upstream::eventually(Duration::from_secs(10), "b's slot to serve", || async {
        unary().await.is_ok()
    })
    .await;
    set_limit(3);
    assert_eq!(reload().await.limits_changed, ["limits.max_in_flight"]);
    let c = open().await;
    assert_eq!(unary().await, Ok(()), "a, c and this call: three slots");
    let d = open().await;
    assert_eq!(
        unary().await,
        Err(Code::Unavailable),
        "a, c, d hold all three"
    );
    drop((a, c, d));
    hub.stop().await;
}

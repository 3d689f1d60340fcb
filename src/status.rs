//! The operators' status page, `/status` on the operations listener ([ops] listen): each
//! upstream with its lag, a chart of what it delivered over the last hour and its recent
//! failed sends; open dead letters; overdue 差评 cases; calendar warnings; certificate expiry.
//! Chinese, readable on a phone, refreshes itself every 30 s, no script. No rater data: only
//! upstream names, counts, feed positions and the upstreams' own (redacted) answers.

use std::collections::BTreeMap;

use maud::{DOCTYPE, Markup, PreEscaped, html};

use crate::api::HubState;
use crate::store::AttemptRecord;

const STYLE: &str = r#"
body{font-family:"Noto Sans CJK SC","PingFang SC","Microsoft YaHei","WenQuanYi Zen Hei",sans-serif;margin:0;color:#1f2933;background:#f5f7fa}
header{background:#1f4e79;color:#fff;padding:10px 16px}
header h1{font-size:1.15rem;margin:0}
header p{margin:4px 0 0;font-size:.8rem;opacity:.9}
main{padding:10px 16px;max-width:1100px;margin:auto}
section{background:#fff;border-radius:6px;padding:10px 12px;margin:10px 0}
h2{font-size:1rem;margin:0 0 8px}
table{border-collapse:collapse;width:100%;font-size:.85rem}
th,td{border-bottom:1px solid #e4e7eb;padding:5px 6px;text-align:left;vertical-align:top}
.wrap{overflow-x:auto}
.bad{color:#b91c1c;font-weight:bold}
.ok{color:#15803d}
.warn{color:#b45309;font-weight:bold}
.muted{color:#7b8794;font-size:.8rem}
figure{margin:6px 0}
svg text{font-size:11px;fill:#52606d}
"#;

/// Cases read at most for the open and overdue counts: those opened in the last
/// `CASE_WINDOW_DAYS` (a case's whole life is weeks).
const CASES_READ: usize = 20_000;
const CASE_WINDOW_DAYS: i64 = 180;
/// How long one rendering of the page is served (it reads many cases).
const PAGE_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// Delivered records per minute over the last hour, oldest minute first (60 values).
fn per_minute(attempts: &[AttemptRecord], now_micros: i64) -> Vec<u32> {
    let mut out = vec![0u32; 60];
    for a in attempts {
        if !matches!(a.outcome.as_str(), "delivered" | "partly_rejected") {
            continue;
        }
        let age_min = (now_micros - a.at_micros) / 60_000_000;
        if (0..60).contains(&age_min) {
            out[59 - age_min as usize] += a.records;
        }
    }
    out
}

fn chart(points: &[u32]) -> Markup {
    if points.iter().all(|n| *n == 0) {
        return html! { p.muted { "近一小时没有送达。" } };
    }
    let max = points.iter().copied().max().unwrap_or(0).max(1);
    let (w, h) = (360usize, 60usize);
    let bar = w / points.len().max(1);
    html! {
        svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="近一小时每分钟送达条数"
            viewBox={ "0 0 " (w) " " (h + 14) } width="100%" style="max-width:480px" {
            @for (i, n) in points.iter().enumerate() {
                @let bh = (*n as usize * h) / max as usize;
                rect x=(i * bar) y=(h - bh) width=(bar.saturating_sub(1).max(1)) height=(bh) fill="#1f4e79" {}
            }
            text x="0" y=(h + 12) { "60分钟前" }
            text x=(w - 24) y=(h + 12) { "现在" }
            text x=(w - 90) y="10" { "峰值 " (max) " 条/分" }
        }
    }
}

/// The 20 units with the most overdue cases, most first.
fn worst(by_org: &BTreeMap<String, u64>) -> Vec<(&String, &u64)> {
    let mut v: Vec<_> = by_org.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    v.truncate(20);
    v
}

fn duration_zh(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s} 秒"),
        60..3600 => format!("{} 分钟", s / 60),
        3600..86_400 => format!("{:.1} 小时", s as f64 / 3600.0),
        _ => format!("{:.1} 天", s as f64 / 86_400.0),
    }
}

/// The page: rendered at most every 30 s, whoever asks (one rendering at a time).
pub async fn page(state: &HubState) -> String {
    let mut cached = state.metrics.status_page.lock().await;
    if let Some((at, page)) = cached.as_ref()
        && at.elapsed() < PAGE_TTL
    {
        return page.clone();
    }
    let page = render(state).await;
    *cached = Some((std::time::Instant::now(), page.clone()));
    page
}

async fn render(state: &HubState) -> String {
    let now = state.clock.now_micros();
    let mut upstreams = Vec::new();
    for name in state.relay.names() {
        let status = state.relay.status(&name).await.ok();
        let attempts = state
            .relay
            .attempts(&name, 0, 2_000)
            .await
            .unwrap_or_default();
        let recent: Vec<AttemptRecord> = attempts
            .iter()
            .filter(|a| now - a.at_micros < 3_600_000_000)
            .cloned()
            .collect();
        let failed: Vec<AttemptRecord> = attempts
            .iter()
            .filter(|a| !matches!(a.outcome.as_str(), "delivered"))
            .take(5)
            .cloned()
            .collect();
        upstreams.push((name, status, per_minute(&recent, now), failed));
    }
    // Overdue 差评 cases: read the newest cases, at most CASES_READ.
    let (mut overdue, mut open, mut read) = (0u64, 0u64, 0usize);
    let mut overdue_by_org: BTreeMap<String, u64> = BTreeMap::new();
    let calendar = state.engine.calendar();
    let profiles = state.engine.profiles();
    let mut after = 0;
    let mut case_error = None;
    while read < CASES_READ {
        let window = Some((now - CASE_WINDOW_DAYS * 86_400_000_000, i64::MAX));
        let page = match state
            .store
            .list_bad_cases_opened(None, window, after, 1000)
            .await
        {
            Ok(p) => p,
            Err(e) => {
                case_error = Some(e.to_string());
                break;
            }
        };
        let full = page.len() == 1000;
        for case in &page {
            after = case.id;
            read += 1;
            let (_, profile) = profiles.for_region(&case.region_code);
            let v = crate::rules::bad_case::view(case, profile, &calendar, now);
            if v.status != crate::pb::v1::CaseStatus::Archived {
                open += 1;
            }
            if v.overdue {
                overdue += 1;
                *overdue_by_org
                    .entry(case.org_credit_code.clone())
                    .or_default() += 1;
            }
        }
        if !full {
            break;
        }
    }
    let missing_years = state.metrics.calendar_missing_years.get();
    let gaps = state.metrics.calendar_gaps.get();
    let certificates = state.metrics.certificate_expiries();
    let head = *state.store.feed_head().borrow();
    let db_up = state.store.ping().await.is_ok();
    html! {
        (DOCTYPE)
        html lang="zh-CN" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta http-equiv="refresh" content="30";
                title { "rating-hub 运行状态" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    h1 { "rating-hub 运行状态" }
                    p { "更新于 " (crate::time::format_cst_micros(now)) "（北京时间），每30秒自动刷新 · 已存评价 " (head) " 条" }
                }
                main {
                    @if !db_up {
                        section #database { p.bad { "数据库无法连接：评价暂不能写入（已确认的评价不会丢失）。" } }
                    }
                    section #upstreams {
                        h2 { "上级平台推送" }
                        @if upstreams.is_empty() { p.muted { "未配置上级平台。" } }
                        @for (name, status, minutes, failed) in &upstreams {
                            div.upstream data-upstream=(name) {
                                @match status {
                                    Some(s) => {
                                        p {
                                            strong { (name) } " · "
                                            @if s.paused { span.warn data-state="paused" { "已暂停" } }
                                            @else if s.last_error.is_some() { span.bad data-state="failing" { "推送失败，重试中" } }
                                            @else if s.lag_records > 0 { span.warn data-state="lagging" { "推送中" } }
                                            @else { span.ok data-state="ok" { "正常" } }
                                            " · 待推送 " span data-col="lag_records" { (s.lag_records) } " 条"
                                            @if s.lag_records > 0 { "（最早已等待 " (duration_zh(s.lag_seconds)) "）" }
                                            " · 死信 " span data-col="dead_letters" { (s.open_dead_letters) } " 条"
                                        }
                                        @if let Some((e, at)) = &s.last_error {
                                            p.bad data-col="last_error" { "最近错误（" (crate::time::format_cst_micros(*at)) "）：" (e) }
                                        }
                                    }
                                    None => { p { strong { (name) } " · " span.bad { "状态无法读取" } } }
                                }
                                figure { (chart(minutes)) figcaption.muted { "近一小时每分钟送达条数" } }
                                @if !failed.is_empty() {
                                    div.wrap {
                                        table.failed {
                                            thead { tr { th { "时间" } th { "结果" } th { "条数" } th { "上级答复" } } }
                                            tbody {
                                                @for a in failed {
                                                    tr {
                                                        td { (crate::time::format_cst_micros(a.at_micros)) }
                                                        td data-col="outcome" { (a.outcome) }
                                                        td { (a.records) }
                                                        td { (a.detail) }
                                                    }
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                    section #cases {
                        h2 { "差评工单" }
                        p {
                            "未办结 " span data-col="open_cases" { (open) } " 件 · 逾期 "
                            span data-col="overdue_cases" class=(if overdue > 0 { "bad" } else { "ok" }) { (overdue) } " 件"
                            span.muted { "（近" (CASE_WINDOW_DAYS) "天开立的工单" @if read >= CASES_READ { "，前 " (CASES_READ) " 件" } "）" }
                        }
                        @if let Some(e) = &case_error { p.bad { "工单无法读取：" (e) } }
                        @if !overdue_by_org.is_empty() {
                            div.wrap { table { thead { tr { th { "单位" } th { "逾期件数" } } } tbody {
                                @for (org, n) in worst(&overdue_by_org) { tr { td { (org) } td { (n) } } }
                            } } }
                        }
                    }
                    section #calendar {
                        h2 { "节假日安排" }
                        @if missing_years > 0 {
                            p.warn data-col="calendar" { "有 " (missing_years) " 个年度尚未载入国务院节假日安排：期限按临时日历计算，请载入 rules.calendar_file。" }
                        } @else {
                            p.ok data-col="calendar" { "节假日安排齐全。" }
                        }
                        @if gaps > 0 { p.warn { (gaps) " 条默认评价等待节假日安排。" } }
                    }
                    section #certificates {
                        h2 { "证书" }
                        @if certificates.is_empty() { p.muted { "未使用证书（明文模式）。" } }
                        div.wrap { table { tbody {
                            @for (label, expiry) in &certificates {
                                @let left = *expiry as f64 - now as f64 / 1e6;
                                tr data-certificate=(label) {
                                    td { (label) }
                                    td class=(if left < 30.0 * 86_400.0 { "bad" } else { "ok" }) {
                                        @if left < 0.0 { "已过期" } @else { (duration_zh(left)) "后到期" }
                                    }
                                }
                            }
                        } } }
                    }
                }
            }
        }
    }
    .into_string()
}

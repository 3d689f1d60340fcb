//! The public site's pages (Chinese, no JavaScript, charts as inline SVG) and its CSV files.
//! Every value comes from `data`; this file only lays it out. Text is escaped by `maud`.

use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::PublicConfig;
use super::data::{Cases, Period, ResultRow, Results};
use crate::api::query::csv_field;

const STYLE: &str = r#"
body{font-family:"Noto Sans CJK SC","PingFang SC","Microsoft YaHei","WenQuanYi Zen Hei",sans-serif;margin:0;color:#1f2933;background:#f5f7fa}
header{background:#b91c1c;color:#fff;padding:12px 16px}
header h1{font-size:1.25rem;margin:0}
header p{margin:4px 0 0;font-size:.85rem;opacity:.9}
main{padding:12px 16px;max-width:1100px;margin:auto}
nav a,nav span{display:inline-block;margin:2px 6px 2px 0;padding:3px 8px;border-radius:4px;background:#e4e7eb;color:#1f2933;text-decoration:none;font-size:.85rem}
nav span.on{background:#b91c1c;color:#fff}
table{border-collapse:collapse;width:100%;background:#fff;font-size:.9rem}
th,td{border-bottom:1px solid #e4e7eb;padding:6px 8px;text-align:right;white-space:nowrap}
th:first-child,td:first-child,th.name,td.name,td.text{text-align:left}
td.text{white-space:normal;min-width:12em}
#cases th,#cases td{text-align:left}
.wrap{overflow-x:auto}
.muted{color:#7b8794;font-size:.85rem}
figure{margin:12px 0}
svg text{font-size:13px;fill:#1f2933}
footer{padding:16px;color:#7b8794;font-size:.8rem;text-align:center}
"#;

fn page(title: &str, subtitle: &str, body: Markup) -> Vec<u8> {
    html! {
        (DOCTYPE)
        html lang="zh-CN" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header { h1 { (title) } p { (subtitle) } }
                main { (body) }
                footer { "政务服务“好差评”评价结果公开 · 评价人信息不予公开 · 数据亦以 JSON、CSV 提供" }
            }
        }
    }
    .into_string()
    .into_bytes()
}

/// An error page (404, 400, 429, 503) in Chinese.
pub fn message_page(status: u16, message: &str) -> Vec<u8> {
    page(
        "政务服务“好差评”评价结果公开",
        &format!("{status}"),
        html! { p #message { (message) } p { a href="/" { "返回首页" } } },
    )
}

fn percent(v: Option<f64>) -> String {
    v.map(|x| format!("{:.1}%", x * 100.0))
        .unwrap_or_else(|| "—".into())
}

fn score(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "—".into())
}

pub fn index_page(regions: &[(String, String)], period: &Period, cases: bool) -> Vec<u8> {
    page(
        "政务服务“好差评”评价结果公开",
        "评价结果及差评整改情况",
        html! {
            p { "选择地区查看" (period.label()) "的评价结果：" }
            ul #regions {
                @for (code, name) in regions {
                    li {
                        a href={ "/results?region=" (code) "&period=" (period.code()) } {
                            @if name.is_empty() { (code) } @else { (name) " (" (code) ")" }
                        }
                        @if cases {
                            " · "
                            a href={ "/cases?region=" (code) "&period=" (period.code()) } { "差评整改情况" }
                        }
                    }
                }
            }
        },
    )
}

fn period_nav(path: &str, region: &str, current: &str, extra: &str) -> Markup {
    let period = Period::parse(current).expect("a parsed period's code");
    html! {
        nav #periods {
            @for p in period.neighbours() {
                @if p.code() == current {
                    span.on { (p.label()) }
                } @else {
                    a href={ (path) "?region=" (region) "&period=" (p.code()) (extra) } { (p.label()) }
                }
            }
        }
    }
}

/// Horizontal bars of 好评率 for the ranked groups (at most 20): readable on a phone, no
/// script.
fn chart(rows: &[&ResultRow]) -> Markup {
    let rows: Vec<&&ResultRow> = rows
        .iter()
        .filter(|r| r.good_rate.is_some())
        .take(20)
        .collect();
    if rows.is_empty() {
        return html! {};
    }
    // Narrow enough that a phone shows it at about its own size; no wider than 640 px on a
    // wide screen.
    let bar_h = 22;
    let label_w = 130;
    let width = 400;
    let height = rows.len() * bar_h + 24;
    html! {
        figure #chart {
            svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="好评率"
                viewBox={ "0 0 " (width) " " (height) } width="100%" style="max-width:640px" {
                title { "好评率" }
                @for (i, r) in rows.iter().enumerate() {
                    @let y = 8 + i * bar_h;
                    @let rate = r.good_rate.unwrap_or(0.0);
                    @let w = ((width - label_w - 56) as f64 * rate).round() as u32;
                    text x="0" y={ (y + 14) } { (truncate(&r.name, 10)) }
                    rect x=(label_w) y=(y) width=(w) height={ (bar_h - 6) } fill="#b91c1c" {}
                    text x={ (label_w + w as usize + 6) } y={ (y + 14) } { (percent(Some(rate))) }
                }
            }
            figcaption.muted { "好评率（评价数不少于公布门槛的单位）" }
        }
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

pub fn results_page(r: &Results, config: &PublicConfig, cases: bool) -> Vec<u8> {
    let region_name = if r.region_name.is_empty() {
        r.region.clone()
    } else {
        format!("{}（{}）", r.region_name, r.region)
    };
    let by = super::data::Grouping::parse(&r.group_by).expect("a parsed grouping");
    let extra = format!("&by={}", r.group_by);
    let ranked: Vec<&ResultRow> = r.groups.iter().filter(|g| !g.withheld).collect();
    let show = |c: &str| config.shows(c);
    let q = format!("?region={}&period={}&by={}", r.region, r.period, r.group_by);
    page(
        &format!("{region_name} {} 政务服务“好差评”评价结果", r.period_label),
        &format!("统计时间：{}（北京时间）", r.computed_at),
        html! {
            (period_nav("/results", &r.region, &r.period, &extra))
            nav #grouping {
                @for g in ["organization", "region", "city", "item"] {
                    @let grouping = super::data::Grouping::parse(g).expect("known");
                    @if g == r.group_by {
                        span.on { "按" (grouping.label()) }
                    } @else {
                        a href={ "/results?region=" (r.region) "&period=" (r.period) "&by=" (g) } { "按" (grouping.label()) }
                    }
                }
                @if cases {
                    a href={ "/cases?region=" (r.region) "&period=" (r.period) } { "差评整改情况" }
                }
            }
            (chart(&ranked))
            div.wrap {
                table #results {
                    thead {
                        tr {
                            @if show("rank") { th { "排名" } }
                            th.name { (by.label()) }
                            th { "评价数" }
                            @if show("levels") {
                                th { "非常满意" } th { "满意" } th { "基本满意" } th { "不满意" } th { "非常不满意" } th { "默认评价" }
                            }
                            @if show("good_rate") { th { "好评率" } }
                            @if show("bad_rate") { th { "差评率" } }
                            @if show("rating_rate") { th { "评价率" } }
                            @if show("score") { th { "平均分" } th { "综合得分" } }
                        }
                    }
                    tbody {
                        @for g in &r.groups {
                            tr data-key=(g.key) data-withheld=(g.withheld) {
                                @if show("rank") { td data-col="rank" { (g.rank.map(|x| x.to_string()).unwrap_or_else(|| "—".into())) } }
                                td.name data-col="name" { (g.name) }
                                td data-col="total" { (g.total) }
                                @if show("levels") {
                                    @for i in 0..5 {
                                        td data-col={ "level" (i + 1) } { (g.levels.map_or("—".to_owned(), |l| l[i].to_string())) }
                                    }
                                    td data-col="default" { (g.default_ratings.map_or("—".to_owned(), |n| n.to_string())) }
                                }
                                @if show("good_rate") { td data-col="good_rate" { (percent(g.good_rate)) } }
                                @if show("bad_rate") { td data-col="bad_rate" { (percent(g.bad_rate)) } }
                                @if show("rating_rate") { td data-col="rating_rate" { (percent(g.rating_rate)) } }
                                @if show("score") {
                                    td data-col="average_score" { (score(g.average_score)) }
                                    td data-col="final_score" { (score(g.final_score)) }
                                }
                            }
                        }
                    }
                }
            }
            @if r.groups.is_empty() { p #empty { "该时段暂无评价。" } }
            p.muted {
                "评价数少于 " (r.min_ratings) " 条的，只公布评价数，不公布各等级数、比率、得分和排名（“—”）。"
                "评价依据：" (r.profile_title) "。已认定为无效评价或恶意差评的不计入。"
            }
            p.muted {
                "数据下载："
                a href={ "/data/results.json" (q) } { "JSON" } " · "
                a href={ "/data/results.csv" (q) } { "CSV" }
            }
        },
    )
}

/// Cases per page.
const CASES_PER_PAGE: usize = 100;

pub fn cases_page(c: &Cases, page_no: u32) -> Vec<u8> {
    let region_name = if c.region_name.is_empty() {
        c.region.clone()
    } else {
        format!("{}（{}）", c.region_name, c.region)
    };
    let pages = c.cases.len().div_ceil(CASES_PER_PAGE).max(1);
    let page_no = (page_no as usize).clamp(1, pages);
    let shown = c
        .cases
        .iter()
        .skip((page_no - 1) * CASES_PER_PAGE)
        .take(CASES_PER_PAGE);
    let rule = match c.publication_rule.as_str() {
        "deadline" => "整改期限届满或办结后公开",
        _ => "整改确认办结后公开",
    };
    let q = format!("?region={}&period={}", c.region, c.period);
    page(
        &format!("{region_name} {} 差评整改情况", c.period_label),
        &format!("统计时间：{}（北京时间）", c.computed_at),
        html! {
            (period_nav("/cases", &c.region, &c.period, ""))
            nav { a href={ "/results" (q) } { "评价结果" } }
            p.muted { "差评" (rule) "，且不早于差评后 " (c.delay_days) " 天。共 " span #count { (c.cases.len()) } " 件。评价人信息不予公开。" }
            div.wrap {
                table #cases {
                    thead { tr { th { "编号" } th { "单位" } th { "事项" } th { "评价" } th { "差评日期" } th { "整改期限" } th { "状态" } th { "整改情况" } th { "办结日期" } } }
                    tbody {
                        @for k in shown {
                            tr data-id=(k.id) data-status=(k.status) {
                                td { (k.id) }
                                td.name { (k.organization_name) }
                                td.name { (k.item_name) }
                                td { (k.level) }
                                td { (k.opened_on) }
                                td { (k.deadline.clone().unwrap_or_else(|| "—".into())) }
                                td data-col="status" { (k.status_label) }
                                td.text data-col="outcome" { (k.outcome) }
                                td { (k.closed_on.clone().unwrap_or_else(|| "—".into())) }
                            }
                        }
                    }
                }
            }
            @if c.cases.is_empty() { p #empty { "该时段暂无可公开的差评整改情况。" } }
            @if pages > 1 {
                nav #pages {
                    @for n in 1..=pages {
                        @if n == page_no { span.on { (n) } } @else { a href={ "/cases" (q) "&page=" (n) } { (n) } }
                    }
                }
            }
            @if c.truncated { p.muted { "条目过多，仅列出前 5000 件；完整数据请按月查看。" } }
            p.muted {
                "数据下载："
                a href={ "/data/cases.json" (q) } { "JSON" } " · "
                a href={ "/data/cases.csv" (q) } { "CSV" }
            }
        },
    )
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_default()
}

pub fn results_csv(r: &Results) -> String {
    // With a byte-order mark: spreadsheets on Chinese Windows read it as UTF-8.
    let mut out = String::from(
        "\u{FEFF}period,region,group_by,key,name,total,very_satisfied,satisfied,basically_satisfied,\
         dissatisfied,very_dissatisfied,default_ratings,good_rate,bad_rate,rating_rate,\
         average_score,final_score,rank,withheld\n",
    );
    for g in &r.groups {
        let l = g.levels.map(|l| l.map(|n| n.to_string()));
        let level = |i: usize| l.as_ref().map(|l| l[i].clone()).unwrap_or_default();
        let cells = [
            r.period.clone(),
            r.region.clone(),
            r.group_by.clone(),
            g.key.clone(),
            g.name.clone(),
            g.total.to_string(),
            level(0),
            level(1),
            level(2),
            level(3),
            level(4),
            opt(g.default_ratings),
            opt(g.good_rate),
            opt(g.bad_rate),
            opt(g.rating_rate),
            opt(g.average_score),
            opt(g.final_score),
            opt(g.rank),
            g.withheld.to_string(),
        ];
        out.push_str(
            &cells
                .iter()
                .map(|c| csv_field(c))
                .collect::<Vec<_>>()
                .join(","),
        );
        out.push('\n');
    }
    out
}

pub fn cases_csv(c: &Cases) -> String {
    let mut out = String::from(
        "\u{FEFF}id,organization,organization_name,item_code,item_name,region,level,opened_on,status,\
         status_label,deadline,outcome,closed_on\n",
    );
    for k in &c.cases {
        let cells = [
            k.id.to_string(),
            k.organization.clone(),
            k.organization_name.clone(),
            k.item_code.clone(),
            k.item_name.clone(),
            k.region.clone(),
            k.level.clone(),
            k.opened_on.clone(),
            k.status.clone(),
            k.status_label.clone(),
            opt(k.deadline.clone()),
            k.outcome.clone(),
            opt(k.closed_on.clone()),
        ];
        out.push_str(
            &cells
                .iter()
                .map(|c| csv_field(c))
                .collect::<Vec<_>>()
                .join(","),
        );
        out.push('\n');
    }
    out
}

//! `/docs`: the API reference, built from the OpenAPI document. The page is complete without
//! script (a table of contents, the operations by tag, the schemas); `docs.js` adds a "Try it"
//! form to each operation that sends the request from the browser with your key and shows the
//! answer. Both assets are compiled into the binary, so the page works offline (no CDN).

use super::openapi::document;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use std::fmt::Write;
use std::sync::OnceLock;

const SCRIPT: &str = include_str!("docs.js");
const STYLE: &str = include_str!("docs.css");

/// Tags in reading order: the API first, the operator's routes last.
const TAG_ORDER: [&str; 5] = ["tasks", "notifications", "usage", "webhooks", "operations"];

/// The interactive API reference (works offline).
#[utoipa::path(get, path = "/docs", tag = "operations",
    responses((status = 200, description = "HTML", body = String, content_type = "text/html")))]
pub async fn docs() -> Response {
    static PAGE: OnceLock<String> = OnceLock::new();
    let page = PAGE.get_or_init(|| render(document())).clone();
    with_headers(page, "text/html; charset=utf-8")
}

pub async fn script() -> Response {
    with_headers(SCRIPT.to_owned(), "text/javascript; charset=utf-8")
}

pub async fn style() -> Response {
    with_headers(STYLE.to_owned(), "text/css; charset=utf-8")
}

fn with_headers(body: String, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Only this origin: the page's script talks to this service and nothing else.
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; \
             connect-src 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    r
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Escaped text with `code` spans as `<code>`.
fn prose(s: &str) -> String {
    let mut out = String::new();
    for (i, part) in s.split('`').enumerate() {
        if i % 2 == 1 {
            let _ = write!(out, "<code>{}</code>", esc(part));
        } else {
            out.push_str(&esc(part));
        }
    }
    // An unmatched backtick leaves an odd count of parts; the text still reads.
    out
}

fn schema_name(v: &Value) -> String {
    if let Some(r) = v.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap_or(r);
        return format!("<a href=\"#schema-{0}\">{0}</a>", esc(name));
    }
    if let Some(items) = v.get("items") {
        return format!("array of {}", schema_name(items));
    }
    if let Some(one) = v.get("oneOf").and_then(Value::as_array) {
        return one.iter().map(schema_name).collect::<Vec<_>>().join(" | ");
    }
    if v.get("format").and_then(Value::as_str) == Some("binary") {
        return "binary".into();
    }
    match v.get("type") {
        Some(Value::String(t)) => esc(t),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .map(esc)
            .collect::<Vec<_>>()
            .join(" | "),
        _ => "object".into(),
    }
}

/// `GET /v1/tasks/{id}` → `get-v1-tasks-id`, an anchor.
fn anchor(method: &str, path: &str) -> String {
    let mut a = String::from(method);
    for c in path.chars() {
        if c.is_ascii_alphanumeric() {
            a.push(c.to_ascii_lowercase());
        } else if !a.ends_with('-') {
            a.push('-');
        }
    }
    a.trim_end_matches('-').to_owned()
}

/// One operation: method, path and its OpenAPI object.
type Op<'a> = (String, String, &'a Value);

/// Every operation, grouped by its first tag, in `TAG_ORDER`.
fn operations(doc: &Value) -> Vec<(String, Vec<Op<'_>>)> {
    let mut groups: Vec<(String, Vec<Op<'_>>)> = TAG_ORDER
        .iter()
        .map(|t| (t.to_string(), Vec::new()))
        .collect();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for (method, op) in item.as_object().into_iter().flatten() {
            let tag = op["tags"][0].as_str().unwrap_or("operations");
            let i = match groups.iter().position(|(t, _)| t == tag) {
                Some(i) => i,
                None => {
                    groups.push((tag.to_owned(), Vec::new()));
                    groups.len() - 1
                }
            };
            groups[i].1.push((method.clone(), path.clone(), op));
        }
    }
    groups.retain(|(_, ops)| !ops.is_empty());
    groups
}

fn render(doc: &Value) -> String {
    let mut h = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>kling-relay API</title><link rel=\"stylesheet\" href=\"/docs/docs.css\">\
         <script defer src=\"/docs/docs.js\"></script></head><body>",
    );
    let info = &doc["info"];
    let groups = operations(doc);
    let tags: Vec<(String, String)> = doc["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            (
                t["name"].as_str().unwrap_or("").to_owned(),
                t["description"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let tag_text = |name: &str| {
        tags.iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.clone())
            .unwrap_or_default()
    };

    // Table of contents.
    h.push_str("<nav id=\"toc\" aria-label=\"Contents\"><p><b>Contents</b></p><ul>");
    for (tag, ops) in &groups {
        let _ = write!(h, "<li><a href=\"#tag-{0}\">{0}</a><ul>", esc(tag));
        for (method, path, _) in ops {
            let _ = write!(
                h,
                "<li><a href=\"#{}\"><span class=\"m m-{2}\">{2}</span> {}</a></li>",
                anchor(method, path),
                esc(path),
                esc(method)
            );
        }
        h.push_str("</ul></li>");
    }
    h.push_str("<li><a href=\"#schemas\">schemas</a></li></ul></nav><main>");

    let _ = write!(
        h,
        "<h1>{}</h1><p>{}</p><p>Machine-readable: <a href=\"/openapi.json\">/openapi.json</a> \
         (OpenAPI {}). Authenticate with <code>Authorization: Bearer &lt;client API key&gt;</code> \
         (<code>kling-relay clients create NAME</code> makes one). Each operation has a \
         <i>Try it</i> form that sends the request from this page with the key below.</p>\
         <p id=\"key-row\"><label for=\"api-key\">API key</label> \
         <input id=\"api-key\" type=\"password\" autocomplete=\"off\" placeholder=\"klr_…\"> \
         <small>kept in this tab only</small></p>",
        esc(info["title"].as_str().unwrap_or("API")),
        prose(info["description"].as_str().unwrap_or("")),
        esc(doc["openapi"].as_str().unwrap_or("3.1"))
    );

    for (tag, ops) in &groups {
        let _ = write!(
            h,
            "<section><h2 id=\"tag-{0}\">{0}</h2><p>{1}</p>",
            esc(tag),
            prose(&tag_text(tag))
        );
        for (method, path, op) in ops {
            operation(&mut h, method, path, op);
        }
        h.push_str("</section>");
    }

    h.push_str("<h2 id=\"schemas\">Schemas</h2>");
    for (name, schema) in doc["components"]["schemas"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let _ = write!(
            h,
            "<h3 id=\"schema-{0}\">{0}</h3><p>{1}</p>",
            esc(name),
            prose(schema["description"].as_str().unwrap_or(""))
        );
        if let Some(props) = schema["properties"].as_object() {
            let required: Vec<&str> = schema["required"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            h.push_str("<table><tr><th>field</th><th>type</th><th>description</th></tr>");
            for (field, p) in props {
                let _ = write!(
                    h,
                    "<tr><td><code>{}</code>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(field),
                    if required.contains(&field.as_str()) {
                        " (required)"
                    } else {
                        ""
                    },
                    schema_name(p),
                    prose(p["description"].as_str().unwrap_or(""))
                );
            }
            h.push_str("</table>");
        } else if let Some(values) = schema["enum"].as_array() {
            let list: Vec<String> = values
                .iter()
                .filter_map(Value::as_str)
                .map(|v| format!("<code>{}</code>", esc(v)))
                .collect();
            let _ = write!(h, "<p>One of {}</p>", list.join(", "));
        }
    }
    h.push_str("</main></body></html>");
    h
}

fn operation(h: &mut String, method: &str, path: &str, op: &Value) {
    let _ = write!(
        h,
        "<div class=\"op\" id=\"{}\" data-method=\"{}\" data-path=\"{}\">\
         <h3><span class=\"m m-{1}\">{1}</span> <code>{2}</code></h3><p><b>{3}</b></p>",
        anchor(method, path),
        esc(method),
        esc(path),
        prose(op["summary"].as_str().unwrap_or(""))
    );
    if let Some(d) = op["description"].as_str() {
        for para in d.split("\n\n") {
            let _ = write!(h, "<p>{}</p>", prose(para));
        }
    }
    if let Some(params) = op["parameters"].as_array().filter(|p| !p.is_empty()) {
        h.push_str(
            "<table><tr><th>parameter</th><th>in</th><th>type</th><th>description</th></tr>",
        );
        for p in params {
            let _ = write!(
                h,
                "<tr><td><code>{}</code>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(p["name"].as_str().unwrap_or("")),
                if p["required"] == true {
                    " (required)"
                } else {
                    ""
                },
                esc(p["in"].as_str().unwrap_or("")),
                schema_name(&p["schema"]),
                prose(p["description"].as_str().unwrap_or(""))
            );
        }
        h.push_str("</table>");
    }
    if let Some(body) = op["requestBody"]["content"].as_object() {
        for (ct, c) in body {
            let _ = write!(
                h,
                "<p>Body (<code>{}</code>): {}</p>",
                esc(ct),
                schema_name(&c["schema"])
            );
        }
    }
    h.push_str("<table><tr><th>status</th><th>meaning</th><th>body</th></tr>");
    for (code, r) in op["responses"].as_object().into_iter().flatten() {
        let body = r["content"]
            .as_object()
            .map(|c| {
                c.iter()
                    .map(|(ct, c)| {
                        format!("{} <code>{}</code>", schema_name(&c["schema"]), esc(ct))
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(code),
            prose(r["description"].as_str().unwrap_or("")),
            body
        );
    }
    h.push_str("</table></div>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_spans_and_anchors() {
        assert_eq!(prose("use `n` < 10"), "use <code>n</code> &lt; 10");
        assert_eq!(anchor("get", "/v1/tasks/{id}"), "get-v1-tasks-id");
    }

    #[test]
    fn the_api_comes_before_the_operators_routes() {
        let page = render(document());
        let tasks = page.find("id=\"post-v1-tasks\"").unwrap();
        let docs = page.find("id=\"get-docs\"").unwrap();
        assert!(tasks < docs);
        assert!(page.contains("<nav id=\"toc\""));
        // No description shows its Markdown backticks.
        let main = &page[page.find("<main>").unwrap()..];
        assert!(!main.contains('`'), "literal backticks in /docs");
    }
}

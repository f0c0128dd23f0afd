//! The API reference page (`GET /api/docs`): the generated OpenAPI document
//! ([`super::openapi::ApiDoc`]) rendered on the server as one self-contained HTML page.
//!
//! Every operation, grouped by tag: method and path, summary and description, parameters, the
//! request body's fields and an example, the responses, and a `curl` line. No JavaScript and
//! no external assets, so it works on machines without internet; the one stylesheet is inline
//! and allowed by its hash in the `Content-Security-Policy`. The page is a minijinja template
//! with HTML auto-escaping (every text of the document is escaped), rendered once per process.

use std::sync::OnceLock;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Serialize;
use serde_json::{json, Map, Value};
use sha2::Digest;
use utoipa::OpenApi;

use crate::error::Error;

/// The page template (`.html`: minijinja auto-escapes every `{{ … }}`).
const TEMPLATE: &str = include_str!("reference.html");
/// The page's stylesheet, inlined in a `<style>` element.
const CSS: &str = include_str!("reference.css");

/// `GET /api/docs`: the rendered page, with a Content-Security-Policy that allows nothing but
/// the inline stylesheet (by hash). No API key: it only describes the API, as
/// `/api/openapi.json` does. Errors: 500 if the template fails to render (a unit test renders it).
pub async fn page() -> Result<Response, Error> {
    static PAGE: OnceLock<Result<String, String>> = OnceLock::new();
    let html = PAGE
        .get_or_init(|| render(&serde_json::to_value(super::openapi::ApiDoc::openapi()).unwrap_or_default()))
        .as_ref()
        .map_err(|e| Error::Internal(anyhow::anyhow!("rendering the API reference: {e}")))?;
    let mut resp = (StatusCode::OK, html.clone()).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&content_security_policy()) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

/// The page's policy: nothing may load or run; only the inline stylesheet, named by its
/// SHA-256 (CSP Level 2 hash source).
pub fn content_security_policy() -> String {
    let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(CSS.as_bytes()));
    format!(
        "default-src 'none'; style-src 'sha256-{hash}'; img-src 'none'; script-src 'none'; base-uri 'none'; \
         form-action 'none'; frame-ancestors 'none'"
    )
}

/// Renders the page for an OpenAPI document (as JSON). Errors: the template engine's message.
pub fn render(doc: &Value) -> Result<String, String> {
    let mut env = minijinja::Environment::new();
    env.add_filter("md", |s: String| minijinja::Value::from_safe_string(inline_code(&s)));
    env.add_template("reference.html", TEMPLATE)
        .map_err(|e| e.to_string())?;
    let page = build_page(doc);
    env.get_template("reference.html")
        .and_then(|t| {
            t.render(minijinja::context! { page => page, css => minijinja::Value::from_safe_string(CSS.to_string()) })
        })
        .map_err(|e| format!("{e:#}"))
}

/// HTML-escapes `text` and shows its `backtick` spans as `<code>` (the document's descriptions
/// use them); with an odd number of backticks the text is only escaped.
fn inline_code(text: &str) -> String {
    let escaped = minijinja::HtmlEscape(text).to_string();
    if escaped.matches('`').count() % 2 != 0 {
        return escaped;
    }
    escaped
        .split('`')
        .enumerate()
        .map(|(i, part)| {
            if i % 2 == 1 {
                format!("<code>{part}</code>")
            } else {
                part.to_string()
            }
        })
        .collect()
}

/// A piece of a type: text, linked to a schema's section when it names one.
#[derive(Serialize, Debug)]
struct Part {
    text: String,
    link: Option<String>,
}

impl Part {
    fn text(s: impl Into<String>) -> Self {
        Part {
            text: s.into(),
            link: None,
        }
    }
}

/// A property of an object schema; nested inline objects appear as `parent.child`.
#[derive(Serialize, Debug)]
struct Field {
    name: String,
    ty: Vec<Part>,
    required: bool,
    description: String,
    default: Option<String>,
}

#[derive(Serialize, Debug)]
struct Param {
    name: String,
    location: String,
    required: bool,
    ty: Vec<Part>,
    description: String,
}

#[derive(Serialize, Debug)]
struct Body {
    content_type: String,
    required: bool,
    ty: Vec<Part>,
    fields: Vec<Field>,
    example: Option<String>,
}

#[derive(Serialize, Debug)]
struct Resp {
    status: String,
    description: String,
    content_type: Option<String>,
    ty: Vec<Part>,
}

#[derive(Serialize, Debug)]
struct Op {
    anchor: String,
    method: String,
    path: String,
    summary: String,
    description: String,
    auth: bool,
    deprecated: bool,
    params: Vec<Param>,
    body: Option<Body>,
    responses: Vec<Resp>,
    curl: String,
}

#[derive(Serialize, Debug)]
struct Tag {
    name: String,
    anchor: String,
    description: String,
    ops: Vec<Op>,
}

#[derive(Serialize, Debug)]
struct Variant {
    ty: Vec<Part>,
    fields: Vec<Field>,
}

#[derive(Serialize, Debug)]
struct SchemaView {
    name: String,
    anchor: String,
    description: String,
    ty: Vec<Part>,
    fields: Vec<Field>,
    variants: Vec<Variant>,
}

#[derive(Serialize, Debug)]
struct Page {
    title: String,
    version: String,
    description: String,
    auth: Vec<String>,
    tags: Vec<Tag>,
    schemas: Vec<SchemaView>,
    operations: usize,
}

const METHODS: [&str; 8] = ["get", "post", "put", "patch", "delete", "head", "options", "trace"];

fn build_page(doc: &Value) -> Page {
    let info = &doc["info"];
    let mut tags: Vec<Tag> = doc["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| {
            let name = t["name"].as_str()?;
            Some(Tag {
                name: name.to_string(),
                anchor: format!("tag-{}", slug(name)),
                description: str_of(&t["description"]),
                ops: Vec::new(),
            })
        })
        .collect();
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        let shared_params = item["parameters"].as_array().cloned().unwrap_or_default();
        for method in METHODS {
            let Some(op) = item.get(method).filter(|o| o.is_object()) else {
                continue;
            };
            operations += 1;
            let view = build_op(doc, method, path, op, &shared_params);
            let tag = op["tags"][0].as_str().unwrap_or("other");
            match tags.iter_mut().find(|t| t.name == tag) {
                Some(t) => t.ops.push(view),
                None => tags.push(Tag {
                    name: tag.to_string(),
                    anchor: format!("tag-{}", slug(tag)),
                    description: String::new(),
                    ops: vec![view],
                }),
            }
        }
    }
    tags.retain(|t| !t.ops.is_empty());

    let schemas = doc["components"]["schemas"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, s)| schema_view(doc, name, s))
        .collect();
    let auth = doc["components"]["securitySchemes"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, s)| {
            let what = match (s["type"].as_str(), s["scheme"].as_str()) {
                (Some("http"), Some(scheme)) => format!("HTTP {scheme}"),
                (Some(t), _) => t.to_string(),
                _ => "unknown".to_string(),
            };
            let desc = str_of(&s["description"]);
            if desc.is_empty() {
                format!("{name}: {what}")
            } else {
                format!("{name}: {what} ({desc})")
            }
        })
        .collect();
    Page {
        title: str_of(&info["title"]),
        version: str_of(&info["version"]),
        description: str_of(&info["description"]),
        auth,
        tags,
        schemas,
        operations,
    }
}

fn build_op(doc: &Value, method: &str, path: &str, op: &Value, shared_params: &[Value]) -> Op {
    let mut params: Vec<Param> = Vec::new();
    for p in shared_params
        .iter()
        .chain(op["parameters"].as_array().into_iter().flatten())
    {
        let p = resolve(doc, p);
        let name = str_of(&p["name"]);
        let location = str_of(&p["in"]);
        // An operation's own parameter replaces a path-level one of the same name and place.
        params.retain(|q| !(q.name == name && q.location == location));
        params.push(Param {
            required: p["required"].as_bool().unwrap_or(location == "path"),
            ty: type_parts(&p["schema"], 0),
            description: str_of(&p["description"]),
            name,
            location,
        });
    }

    let body = op["requestBody"].as_object().map(|rb| {
        let rb = resolve(doc, &Value::Object(rb.clone())).clone();
        let (content_type, media) = rb["content"]
            .as_object()
            .and_then(|c| c.iter().next())
            .map(|(k, v)| (k.clone(), v.clone()))
            .unwrap_or_default();
        let schema = &media["schema"];
        let mut fields = Vec::new();
        collect_fields(doc, resolve(doc, schema), "", 0, &mut fields);
        let example = (!schema.is_null()).then(|| example_value(doc, schema, 0));
        Body {
            required: rb["required"].as_bool().unwrap_or(false),
            ty: type_parts(schema, 0),
            fields,
            example: example.map(|e| serde_json::to_string_pretty(&e).unwrap_or_default()),
            content_type,
        }
    });

    let responses = op["responses"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(status, r)| {
            let r = resolve(doc, r);
            let media = r["content"].as_object().and_then(|c| c.iter().next());
            Resp {
                status: status.clone(),
                description: str_of(&r["description"]),
                content_type: media.map(|(k, _)| k.clone()),
                ty: media.map(|(_, m)| type_parts(&m["schema"], 0)).unwrap_or_default(),
            }
        })
        .collect();

    let auth = op["security"]
        .as_array()
        .map(|s| s.iter().any(|req| req.as_object().is_some_and(|o| !o.is_empty())))
        .unwrap_or_else(|| doc["security"].as_array().is_some_and(|s| !s.is_empty()));
    let curl = curl_line(method, path, &params, auth, body.as_ref());
    Op {
        anchor: format!("op-{method}-{}", slug(path)),
        method: method.to_ascii_uppercase(),
        path: path.to_string(),
        summary: str_of(&op["summary"]),
        description: str_of(&op["description"]),
        deprecated: op["deprecated"].as_bool().unwrap_or(false),
        auth,
        params,
        body,
        responses,
        curl,
    }
}

fn schema_view(doc: &Value, name: &str, s: &Value) -> SchemaView {
    let mut fields = Vec::new();
    collect_fields(doc, s, "", 0, &mut fields);
    let alternatives = s["oneOf"].as_array().or_else(|| s["anyOf"].as_array());
    let variants = if fields.is_empty() {
        alternatives
            .into_iter()
            .flatten()
            .map(|alt| {
                let mut fields = Vec::new();
                collect_fields(doc, alt, "", 0, &mut fields);
                Variant {
                    ty: if fields.is_empty() {
                        type_parts(alt, 0)
                    } else {
                        vec![Part::text("object")]
                    },
                    fields,
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    SchemaView {
        name: name.to_string(),
        anchor: schema_anchor(name),
        description: str_of(&s["description"]),
        ty: if fields.is_empty() && variants.is_empty() {
            type_parts(s, 0)
        } else {
            Vec::new()
        },
        fields,
        variants,
    }
}

fn schema_anchor(name: &str) -> String {
    format!("schema-{}", slug(name))
}

/// `#/components/schemas/X` → `X`.
fn ref_name(s: &Value) -> Option<&str> {
    s["$ref"].as_str().map(|r| r.rsplit('/').next().unwrap_or(r))
}

/// Follows `$ref`s within the document (at most a few hops; a dangling one is left as is).
fn resolve<'a>(doc: &'a Value, mut s: &'a Value) -> &'a Value {
    for _ in 0..8 {
        match s["$ref"]
            .as_str()
            .and_then(|r| r.strip_prefix('#'))
            .and_then(|p| doc.pointer(p))
        {
            Some(target) => s = target,
            None => break,
        }
    }
    s
}

fn str_of(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// A schema as readable type text: `string (date-time) | null`, `array of MessageOut`, …
fn type_parts(s: &Value, depth: usize) -> Vec<Part> {
    let mut out = Vec::new();
    push_type(s, depth, &mut out);
    if out.is_empty() {
        out.push(Part::text("any"));
    }
    out
}

fn push_type(s: &Value, depth: usize, out: &mut Vec<Part>) {
    if depth > 6 {
        out.push(Part::text("…"));
        return;
    }
    if let Some(name) = ref_name(s) {
        out.push(Part {
            text: name.to_string(),
            link: Some(schema_anchor(name)),
        });
        return;
    }
    for (key, sep) in [("oneOf", " | "), ("anyOf", " | "), ("allOf", " & ")] {
        if let Some(alts) = s[key].as_array() {
            for (i, alt) in alts.iter().enumerate() {
                if i > 0 {
                    out.push(Part::text(sep));
                }
                push_type(alt, depth + 1, out);
            }
            return;
        }
    }
    if let Some(values) = s["enum"].as_array() {
        let text = values.iter().map(Value::to_string).collect::<Vec<_>>().join(" | ");
        out.push(Part::text(text));
        return;
    }
    if let Some(c) = s.get("const") {
        out.push(Part::text(c.to_string()));
        return;
    }
    let types: Vec<&str> = match &s["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ if s.get("properties").is_some() => vec!["object"],
        _ => vec![],
    };
    for (i, t) in types.iter().enumerate() {
        if i > 0 {
            out.push(Part::text(" | "));
        }
        match *t {
            "array" => {
                out.push(Part::text("array of "));
                match s.get("items") {
                    Some(items) => push_type(items, depth + 1, out),
                    None => out.push(Part::text("any")),
                }
            }
            "object" => match s.get("additionalProperties").filter(|a| a.is_object()) {
                Some(ap) => {
                    out.push(Part::text("map of string to "));
                    push_type(ap, depth + 1, out);
                }
                None => out.push(Part::text("object")),
            },
            "null" => out.push(Part::text("null")),
            other => {
                let mut text = other.to_string();
                let mut notes: Vec<String> = Vec::new();
                if let Some(f) = s["format"].as_str() {
                    notes.push(f.to_string());
                }
                if let Some(m) = s.get("minimum").filter(|m| m.is_number()) {
                    notes.push(format!("≥ {m}"));
                }
                if let Some(m) = s.get("maximum").filter(|m| m.is_number()) {
                    notes.push(format!("≤ {m}"));
                }
                if !notes.is_empty() {
                    text = format!("{text} ({})", notes.join(", "));
                }
                out.push(Part::text(text));
            }
        }
    }
}

/// The properties of an object schema (through `allOf` and into inline nested objects),
/// required ones first in the order the document gives them, then the rest by name.
fn collect_fields(doc: &Value, s: &Value, prefix: &str, depth: usize, out: &mut Vec<Field>) {
    if depth > 4 {
        return;
    }
    if let Some(all) = s["allOf"].as_array() {
        for member in all {
            collect_fields(doc, resolve(doc, member), prefix, depth + 1, out);
        }
    }
    let Some(props) = s["properties"].as_object() else {
        return;
    };
    let required: Vec<&str> = s["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let mut names: Vec<&String> = props.keys().collect();
    names.sort_by_key(|n| (required.iter().position(|r| r == n).unwrap_or(usize::MAX), n.as_str()));
    for name in names {
        let p = &props[name];
        let full = format!("{prefix}{name}");
        out.push(Field {
            name: full.clone(),
            ty: type_parts(p, 0),
            required: required.contains(&name.as_str()),
            description: str_of(&p["description"]),
            default: p.get("default").map(Value::to_string),
        });
        // Inline objects (not references, which have their own section) are spelled out.
        if p.get("$ref").is_none() {
            if p.get("properties").is_some() {
                collect_fields(doc, p, &format!("{full}."), depth + 1, out);
            } else if p["items"].get("properties").is_some() {
                collect_fields(doc, &p["items"], &format!("{full}[]."), depth + 1, out);
            }
        }
    }
}

/// An example value for a schema: its own `example`/`examples`/`default`, else one made from
/// the types (required properties and those with an example of their own).
fn example_value(doc: &Value, s: &Value, depth: usize) -> Value {
    if depth > 6 {
        return Value::Null;
    }
    if let Some(e) = s.get("example") {
        return e.clone();
    }
    if let Some(e) = s["examples"].as_array().and_then(|e| e.first()) {
        return e.clone();
    }
    if let Some(d) = s.get("default") {
        return d.clone();
    }
    if s.get("$ref").is_some() {
        return example_value(doc, resolve(doc, s), depth + 1);
    }
    if let Some(all) = s["allOf"].as_array() {
        let mut merged = Map::new();
        for member in all {
            match example_value(doc, member, depth + 1) {
                Value::Object(o) => merged.extend(o),
                other if all.len() == 1 => return other,
                _ => {}
            }
        }
        return Value::Object(merged);
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(alts) = s[key].as_array() {
            let alt = alts.iter().find(|a| a["type"] != "null").or(alts.first());
            return alt.map(|a| example_value(doc, a, depth + 1)).unwrap_or(Value::Null);
        }
    }
    if let Some(first) = s["enum"].as_array().and_then(|e| e.first()) {
        return first.clone();
    }
    let ty = match &s["type"] {
        Value::String(t) => t.as_str(),
        Value::Array(ts) => ts
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("null"),
        _ if s.get("properties").is_some() => "object",
        _ => "",
    };
    match ty {
        "string" => match s["format"].as_str() {
            Some("date-time") => json!("2026-01-01T12:00:00Z"),
            Some("date") => json!("2026-01-01"),
            Some("uri") | Some("url") => json!("https://example.com/"),
            _ => json!("string"),
        },
        "integer" => s.get("minimum").cloned().unwrap_or(json!(0)),
        "number" => json!(0),
        "boolean" => json!(false),
        "array" => json!([example_value(doc, &s["items"], depth + 1)]),
        "object" => {
            let required: Vec<&str> = s["required"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let mut o = Map::new();
            for (name, p) in s["properties"].as_object().into_iter().flatten() {
                if required.contains(&name.as_str()) || p.get("example").is_some() {
                    o.insert(name.clone(), example_value(doc, p, depth + 1));
                }
            }
            Value::Object(o)
        }
        "null" => Value::Null,
        _ => json!({}),
    }
}

/// A `curl` command for the operation: `$SWITCHBOARD_URL` and `$SWITCHBOARD_API_KEY` from the
/// shell, path parameters as shell variables (`{id}` → `$ID`), required query parameters.
fn curl_line(method: &str, path: &str, params: &[Param], auth: bool, body: Option<&Body>) -> String {
    let mut url = String::from("$SWITCHBOARD_URL");
    let mut rest = path;
    while let Some(start) = rest.find('{') {
        let Some(len) = rest[start..].find('}') else {
            break;
        };
        url.push_str(&rest[..start]);
        let name = &rest[start + 1..start + len];
        url.push_str(&format!(
            "${{{}}}",
            name.to_ascii_uppercase()
                .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        ));
        rest = &rest[start + len + 1..];
    }
    url.push_str(rest);
    let query: Vec<String> = params
        .iter()
        .filter(|p| p.location == "query" && p.required)
        .map(|p| format!("{}=…", p.name))
        .collect();
    if !query.is_empty() {
        url.push('?');
        url.push_str(&query.join("&"));
    }
    let mut lines = vec![if method == "get" {
        format!("curl \"{url}\"")
    } else {
        format!("curl -X {} \"{url}\"", method.to_ascii_uppercase())
    }];
    if auth {
        lines.push("-H \"Authorization: Bearer $SWITCHBOARD_API_KEY\"".to_string());
    }
    for p in params.iter().filter(|p| p.location == "header" && p.required) {
        lines.push(format!("-H '{}: …'", p.name));
    }
    if let Some(b) = body {
        lines.push(format!("-H 'Content-Type: {}'", b.content_type));
        if let Some(example) = &b.example {
            let data = if b.content_type == "application/x-www-form-urlencoded" {
                form_example(example)
            } else {
                example.clone()
            };
            lines.push(format!("-d '{}'", data.replace('\'', "'\\''")));
        }
    }
    lines.join(" \\\n  ")
}

/// A JSON object example as a form body (`a=1&b=x`).
fn form_example(json_text: &str) -> String {
    let Ok(Value::Object(o)) = serde_json::from_str::<Value>(json_text) else {
        return String::new();
    };
    let pairs: Vec<(String, String)> = o
        .into_iter()
        .map(|(k, v)| (k, v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())))
        .collect();
    serde_urlencoded::to_string(pairs).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Value {
        serde_json::to_value(super::super::openapi::ApiDoc::openapi()).unwrap()
    }

    #[test]
    fn the_page_renders_every_operation_once() {
        let doc = doc();
        let html = render(&doc).unwrap();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in METHODS {
                if item.get(method).is_some() {
                    let anchor = format!("id=\"op-{method}-{}\"", slug(path));
                    assert_eq!(html.matches(&anchor).count(), 1, "{anchor}");
                }
            }
        }
        assert!(
            html.contains("<style>") && !html.contains("<script"),
            "no script on the page"
        );
    }

    #[test]
    fn text_from_the_document_is_escaped() {
        let mut doc = doc();
        doc["info"]["description"] = json!("<script>alert(1)</script> & \"quotes\"");
        let html = render(&doc).unwrap();
        assert!(!html.contains("<script>alert(1)"));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt;"), "escaped");
    }

    #[test]
    fn backticks_become_code_after_escaping() {
        assert_eq!(
            inline_code("`sms` or `<b>`"),
            "<code>sms</code> or <code>&lt;b&gt;</code>"
        );
        assert_eq!(inline_code("a ` b <"), "a ` b &lt;");
    }

    #[test]
    fn types_read_as_text_with_links_to_schemas() {
        let t = |v: Value| {
            type_parts(&v, 0)
                .iter()
                .map(|p| match &p.link {
                    Some(l) => format!("[{}](#{l})", p.text),
                    None => p.text.clone(),
                })
                .collect::<String>()
        };
        assert_eq!(
            t(json!({"type": ["string", "null"], "format": "date-time"})),
            "string (date-time) | null"
        );
        assert_eq!(
            t(json!({"type": "array", "items": {"$ref": "#/components/schemas/MessageOut"}})),
            "array of [MessageOut](#schema-messageout)"
        );
        assert_eq!(
            t(json!({"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/A"}]})),
            "null | [A](#schema-a)"
        );
        assert_eq!(
            t(json!({"type": "string", "enum": ["normal", "high"]})),
            "\"normal\" | \"high\""
        );
        assert_eq!(
            t(json!({"type": "integer", "format": "int32", "minimum": 0})),
            "integer (int32, ≥ 0)"
        );
        assert_eq!(t(json!({})), "any");
    }

    #[test]
    fn the_send_example_is_a_valid_send() {
        let doc = doc();
        let schema = &doc["paths"]["/api/v1/messages"]["post"]["requestBody"]["content"]["application/json"]["schema"];
        let example = example_value(&doc, schema, 0);
        let input: crate::service::SendInput = serde_json::from_value(example.clone()).unwrap();
        assert!(crate::domain::PhoneNumber::parse(&input.to, "US").is_ok(), "{example}");
        assert!(input.body.is_some_and(|b| !b.is_empty()), "{example}");
    }

    #[test]
    fn curl_uses_shell_variables_for_path_parameters() {
        let params = vec![Param {
            name: "id".into(),
            location: "path".into(),
            required: true,
            ty: vec![],
            description: String::new(),
        }];
        let body = Body {
            content_type: "application/json".into(),
            required: true,
            ty: vec![],
            fields: vec![],
            example: Some("{\"body\": \"it's\"}".into()),
        };
        assert_eq!(
            curl_line("post", "/api/v1/conversations/{id}/read", &params, true, Some(&body)),
            "curl -X POST \"$SWITCHBOARD_URL/api/v1/conversations/${ID}/read\" \\\n  \
             -H \"Authorization: Bearer $SWITCHBOARD_API_KEY\" \\\n  \
             -H 'Content-Type: application/json' \\\n  -d '{\"body\": \"it'\\''s\"}'"
        );
    }
}

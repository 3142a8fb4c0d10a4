//! Chat templates: the model's own Jinja template (from `tokenizer_config.json` or
//! `chat_template.jinja`) rendered with minijinja the way transformers renders it
//! (`trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, a
//! Python-style `tojson`, Python string methods), and the byte spans of the rendered text that
//! belong to assistant turns, which is what response-only loss trains on.

use std::ops::Range;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{context, Environment, Error, ErrorKind};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum TemplateError {
    #[error("chat template does not parse: {0}")]
    Syntax(String),
    #[error("chat template failed: {0}")]
    Render(String),
    #[error("chat template raised: {0}")]
    Raised(String),
    #[error("message {index} ({role}): the chat template does not reproduce its content, so its tokens cannot be found")]
    ContentNotFound { index: usize, role: &'static str },
}

/// Rendered conversation and where the assistant turns are in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedChat {
    pub text: String,
    /// Byte ranges of `text` to train on: each assistant turn's content and its end-of-turn
    /// marker (e.g. `<|eot_id|>`), in order, without surrounding whitespace.
    pub assistant_spans: Vec<Range<usize>>,
}

const TEMPLATE_NAME: &str = "chat_template";

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Texts that end a turn (EOS and the tokenizer's special tokens), longest first.
    end_markers: Vec<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

/// minijinja's message (kind, detail, template line) on one line.
fn one_line(e: &Error) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

impl ChatTemplate {
    /// Compile `source`. `bos_token`/`eos_token` are the texts the template sees under those
    /// names; `special_tokens` are the tokenizer's special token texts (end-of-turn markers).
    pub fn new(
        source: &str,
        bos_token: &str,
        eos_token: &str,
        special_tokens: &[String],
    ) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        // transformers compiles chat templates with trim_blocks and lstrip_blocks.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("default delimiters are valid"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(
                ErrorKind::InvalidOperation,
                RAISED_PREFIX.to_string() + &msg,
            ))
        });
        env.add_function("strftime_now", |fmt: String| -> String {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            strftime(&fmt, secs)
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| TemplateError::Syntax(one_line(&e)))?;
        let mut end_markers: Vec<String> = special_tokens
            .iter()
            .chain(std::iter::once(&eos_token.to_string()))
            .filter(|s| !s.is_empty())
            .cloned()
            .collect();
        end_markers.sort_by_key(|s| std::cmp::Reverse(s.len()));
        end_markers.dedup();
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            end_markers,
        })
    }

    /// Render messages as transformers' `apply_chat_template(..., tokenize=False)` would.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TemplateError::Syntax(one_line(&e)))?;
        tmpl.render(context! {
            messages => messages_value(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
            // transformers passes these as None; templates test `tools is not none`.
            tools => Value::from(()),
            documents => Value::from(()),
        })
        .map_err(|e| match e.detail() {
            Some(d) if d.starts_with(RAISED_PREFIX) => {
                TemplateError::Raised(d[RAISED_PREFIX.len()..].to_string())
            }
            _ => TemplateError::Render(one_line(&e)),
        })
    }

    /// Render the whole conversation and find the assistant turns in it.
    ///
    /// Preferred: the prefix rule. If rendering `messages[..i]` with the generation prompt
    /// gives `p`, and `messages[..=i]` gives `q`, and `p` is a prefix of `q` which is a prefix
    /// of the full text, then assistant turn `i` is `q[p.len()..]`: its content plus whatever
    /// the template closes the turn with. Templates that render earlier turns differently once
    /// later ones follow (e.g. dropping reasoning from old turns) break the rule; for those
    /// the turn's content is searched in the text, in message order, and extended over an
    /// end-of-turn marker that directly follows it.
    pub fn render_with_assistant_spans(
        &self,
        messages: &[Message],
    ) -> Result<RenderedChat, TemplateError> {
        let text = self.render(messages, false)?;
        let mut spans = Vec::new();
        // Search cursor for the fallback: every message's content is found in order, so a
        // short answer is not matched inside the question before it.
        let mut cursor = 0usize;
        for (i, m) in messages.iter().enumerate() {
            if m.role != Role::Assistant {
                let needle = m.content.trim();
                if !needle.is_empty() {
                    if let Some(at) = text[cursor..].find(needle) {
                        cursor += at + needle.len();
                    }
                }
                continue;
            }
            let by_prefix = match (
                self.render(&messages[..i], true),
                self.render(&messages[..=i], false),
            ) {
                (Ok(p), Ok(q))
                    if q.starts_with(&p) && text.starts_with(&q) && p.len() >= cursor =>
                {
                    Some(trim_range(&text, p.len()..q.len()))
                }
                _ => None,
            };
            let span = match by_prefix {
                Some(s) => s,
                None => {
                    let needle = m.content.trim();
                    let at = text[cursor..]
                        .find(needle)
                        .ok_or(TemplateError::ContentNotFound {
                            index: i,
                            role: "assistant",
                        })?;
                    let start = cursor + at;
                    let mut end = start + needle.len();
                    let rest = &text[end..];
                    let ws = rest.len() - rest.trim_start().len();
                    if let Some(marker) = self
                        .end_markers
                        .iter()
                        .find(|mk| rest[ws..].starts_with(mk.as_str()))
                    {
                        end += ws + marker.len();
                    }
                    start..end
                }
            };
            cursor = cursor.max(span.end);
            spans.push(span);
        }
        Ok(RenderedChat {
            text,
            assistant_spans: spans,
        })
    }
}

/// Messages as the template sees them: a list of `{"role": ..., "content": ...}` maps.
fn messages_value(messages: &[Message]) -> Value {
    messages
        .iter()
        .map(|m| {
            Value::from_pairs([
                ("role", Value::from(m.role.as_str())),
                ("content", Value::from(m.content.as_str())),
            ])
        })
        .collect()
}

const RAISED_PREFIX: &str = "raise_exception: ";

fn trim_range(text: &str, r: Range<usize>) -> Range<usize> {
    let s = &text[r.clone()];
    let lead = s.len() - s.trim_start().len();
    let trail = s.len() - s.trim_end().len();
    if lead == s.len() {
        return r.start..r.start;
    }
    r.start + lead..r.end - trail
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent)`,
/// i.e. Python's separators (`", "`, `": "`), keys in insertion order, no HTML escaping.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent.or(kwargs.get::<Option<Value>>("indent")?) {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(
            v.as_i64()
                .ok_or_else(|| Error::new(ErrorKind::InvalidOperation, "indent must be a number"))?
                .max(0) as usize,
        ),
    };
    let _ = kwargs.get::<Option<Value>>("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, indent, 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    out: &mut String,
    v: &Value,
    indent: Option<usize>,
    depth: usize,
) -> Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&v.to_string()),
        ValueKind::String => {
            out.push_str(&serde_json::to_string(v.as_str().unwrap_or("")).unwrap())
        }
        ValueKind::Map => {
            out.push('{');
            let keys: Vec<Value> = v.try_iter()?.collect();
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                let key = k
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| k.to_string());
                out.push_str(&serde_json::to_string(&key).unwrap());
                out.push_str(": ");
                write_json(out, &v.get_item(k)?, indent, depth + 1)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            let items: Vec<Value> = v.try_iter()?.collect();
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, indent, depth + 1)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize a {}", v.kind()),
            ))
        }
    }
    Ok(())
}

/// A subset of C's strftime on UTC time, enough for the dates chat templates print
/// (Llama 3.1's `strftime_now("%d %b %Y")`): %Y %y %m %d %-d %e %H %M %S %b %B %a %A %j %%.
pub fn strftime(fmt: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next();
        let no_pad = spec == Some('-');
        if no_pad {
            spec = chars.next();
        }
        let num = |v: i64, width: usize| {
            if no_pad {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        match spec {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&num(y.rem_euclid(100), 2)),
            Some('m') => out.push_str(&num(m as i64, 2)),
            Some('d') => out.push_str(&num(d as i64, 2)),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('H') => out.push_str(&num(secs / 3600, 2)),
            Some('M') => out.push_str(&num(secs / 60 % 60, 2)),
            Some('S') => out.push_str(&num(secs % 60, 2)),
            Some('j') => out.push_str(&num(yday, 3)),
            Some('b') => out.push_str(&MONTHS[m as usize - 1][..3]),
            Some('B') => out.push_str(MONTHS[m as usize - 1]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Shaped like Meta's Llama-3 Instruct template (written here for the test).
    pub(crate) const LLAMA3_TEMPLATE: &str = "{% set loop_messages = messages %}\
{% for message in loop_messages %}\
{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}\
{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}\
{{ content }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    fn llama3() -> ChatTemplate {
        ChatTemplate::new(
            LLAMA3_TEMPLATE,
            "<|begin_of_text|>",
            "<|eot_id|>",
            &["<|eot_id|>".to_string(), "<|end_of_text|>".to_string()],
        )
        .unwrap()
    }

    fn convo() -> Vec<Message> {
        vec![
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "Say hi "),
            Message::new(Role::Assistant, "hi"),
            Message::new(Role::User, "Again?"),
            Message::new(Role::Assistant, "hi again"),
        ]
    }

    #[test]
    fn renders_a_llama3_style_template() {
        let t = llama3();
        let text = t.render(&convo()[..2], true).unwrap();
        assert_eq!(
            text,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
<|start_header_id|>user<|end_header_id|>\n\nSay hi<|eot_id|>\
<|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn assistant_spans_cover_content_and_end_of_turn() {
        let t = llama3();
        let r = t.render_with_assistant_spans(&convo()).unwrap();
        let spans: Vec<&str> = r
            .assistant_spans
            .iter()
            .map(|s| &r.text[s.clone()])
            .collect();
        assert_eq!(spans, ["hi<|eot_id|>", "hi again<|eot_id|>"]);
    }

    /// A template that renders old assistant turns differently from the last one (as reasoning
    /// models' templates do) breaks the prefix rule for the old turns; the content search
    /// finds them, in message order (the question contains the answer's text too).
    #[test]
    fn assistant_spans_fallback_search() {
        let src = "{% for m in messages %}<|{{ m.role }}|>\
{% if m.role == 'assistant' and not loop.last %}(old) {% endif %}{{ m.content }}</s>\n\
{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
        let t = ChatTemplate::new(src, "", "</s>", &[]).unwrap();
        let msgs = vec![
            Message::new(Role::User, "say thought"),
            Message::new(Role::Assistant, "thought"),
            Message::new(Role::User, "more"),
            Message::new(Role::Assistant, "final"),
        ];
        let r = t.render_with_assistant_spans(&msgs).unwrap();
        assert_eq!(
            r.text,
            "<|user|>say thought</s>\n<|assistant|>(old) thought</s>\n<|user|>more</s>\n<|assistant|>final</s>\n"
        );
        let starts: Vec<usize> = r.assistant_spans.iter().map(|s| s.start).collect();
        let spans: Vec<&str> = r
            .assistant_spans
            .iter()
            .map(|s| &r.text[s.clone()])
            .collect();
        assert_eq!(spans, ["thought</s>", "final</s>"]);
        assert_eq!(starts[0], r.text.find("(old) ").unwrap() + 6);
    }

    #[test]
    fn content_not_reproduced_is_an_error() {
        let src = "{% for m in messages %}{{ m.role }}{% endfor %}";
        let t = ChatTemplate::new(src, "", "", &[]).unwrap();
        let e = t
            .render_with_assistant_spans(&[
                Message::new(Role::User, "a"),
                Message::new(Role::Assistant, "zzz"),
            ])
            .unwrap_err();
        assert_eq!(
            e,
            TemplateError::ContentNotFound {
                index: 1,
                role: "assistant"
            }
        );
    }

    #[test]
    fn hf_template_features() {
        let src = "{% for m in messages %}\
{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}\
{% if loop.index0 > 0 %}{% break %}{% endif %}\
[{{ m.content.strip().upper() }}|{{ m.content.startswith(' x') }}|{{ m | tojson }}|{{ tools is none }}]\
{% endfor %}";
        let t = ChatTemplate::new(src, "", "", &[]).unwrap();
        let out = t
            .render(
                &[
                    Message::new(Role::User, " x<é>\"\n"),
                    Message::new(Role::Assistant, "never"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "[X<É>\"|True|{\"role\": \"user\", \"content\": \" x<é>\\\"\\n\"}|True]"
        );
        let e = t
            .render(&[Message::new(Role::System, "s")], false)
            .unwrap_err();
        assert_eq!(
            e,
            TemplateError::Raised("Only user and assistant roles are supported!".into())
        );
        let e = ChatTemplate::new("{% for %}", "", "", &[]).unwrap_err();
        assert!(matches!(e, TemplateError::Syntax(_)), "{e:?}");
        assert!(!e.to_string().contains('\n'));
    }

    /// Shaped like Llama 3.1's template: whitespace control, `is defined`, `strftime_now`,
    /// reassigning `messages` to a slice, a system block the template writes itself.
    const LLAMA31_LIKE: &str = r#"{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{%- set ns = namespace(turns=0) %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- set ns.turns = ns.turns + 1 %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
{{- '' if ns.turns > 0 else raise_exception('no turns') }}"#;

    #[test]
    fn llama31_like_template() {
        let t = ChatTemplate::new(
            LLAMA31_LIKE,
            "<|begin_of_text|>",
            "<|eot_id|>",
            &["<|eot_id|>".to_string()],
        )
        .unwrap();
        let r = t.render_with_assistant_spans(&convo()).unwrap();
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let date = strftime("%d %b %Y", secs);
        assert_eq!(
            r.text,
            format!(
                "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
Today Date: {date}\n\nBe brief.<|eot_id|>\
<|start_header_id|>user<|end_header_id|>\n\nSay hi<|eot_id|>\
<|start_header_id|>assistant<|end_header_id|>\n\nhi<|eot_id|>\
<|start_header_id|>user<|end_header_id|>\n\nAgain?<|eot_id|>\
<|start_header_id|>assistant<|end_header_id|>\n\nhi again<|eot_id|>"
            )
        );
        let spans: Vec<&str> = r
            .assistant_spans
            .iter()
            .map(|s| &r.text[s.clone()])
            .collect();
        assert_eq!(spans, ["hi<|eot_id|>", "hi again<|eot_id|>"]);
        assert_eq!(
            t.render(&convo()[..1], false).unwrap_err(),
            TemplateError::Raised("no turns".into())
        );
    }

    #[test]
    fn tojson_indent_and_strftime() {
        let t = ChatTemplate::new("{{ messages | tojson(indent=2) }}", "", "", &[]).unwrap();
        let out = t.render(&[Message::new(Role::User, "a")], false).unwrap();
        assert_eq!(
            out,
            "[\n  {\n    \"role\": \"user\",\n    \"content\": \"a\"\n  }\n]"
        );
        // 2024-07-26 13:05:09 UTC, a Friday.
        let ts = 1_722_000_000 - 1_722_000_000 % 86_400 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(
            strftime("%d %b %Y|%-d %B %y|%a %A|%H:%M:%S|%j|%%", ts),
            "26 Jul 2024|26 July 24|Fri Friday|13:05:09|208|%"
        );
        assert_eq!(strftime("%Y-%m-%d", 0), "1970-01-01");
        assert_eq!(strftime("%Y-%m-%d", 951_782_400), "2000-02-29");
        let t = ChatTemplate::new("{{ strftime_now('%Y') }}", "", "", &[]).unwrap();
        let year: i64 = t.render(&[], false).unwrap().parse().unwrap();
        assert!(year >= 2024);
    }
}

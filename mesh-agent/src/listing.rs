//! What the list commands (`service ls`, `service ps`, `node ls`) print: a table, the
//! JSON of each row, the first column only (`-q`), or one line per row from a
//! Go-template-like `--format '{{.Name}} {{.Vip}}'`, over the rows `--filter` keeps.

use anyhow::{Result, bail};
use serde::Serialize;

use crate::cli::{Format, ListArgs};
use crate::commands::table;

/// A column: its table header and the key that names it in `--filter` and templates.
pub struct Column {
    pub header: &'static str,
    pub key: &'static str,
}

pub const fn col(header: &'static str, key: &'static str) -> Column {
    Column { header, key }
}

/// One row: its cells, in column order, and the value `--format json` prints.
/// `marked`: the table shows `*` after its first cell (the host that answered, as
/// `docker node ls` marks the current node); filters, `-q` and templates see the
/// cells alone.
pub struct Row<T> {
    pub cells: Vec<String>,
    pub marked: bool,
    pub value: T,
}

/// `key=value` filters: the same key given twice matches either value, different keys
/// must all match. `name` matches a prefix, as Docker's does; other keys match whole.
#[derive(Debug)]
struct Filters(Vec<(usize, Vec<String>)>);

impl Filters {
    fn parse(texts: &[String], columns: &[Column]) -> Result<Filters> {
        let mut out: Vec<(usize, Vec<String>)> = Vec::new();
        for text in texts {
            let Some((key, value)) = text.split_once('=') else {
                bail!(
                    "--filter {text:?}: write key=value, e.g. --filter {}=…",
                    columns[0].key
                );
            };
            let Some(i) = columns.iter().position(|c| c.key == key) else {
                let keys: Vec<&str> = columns.iter().map(|c| c.key).collect();
                bail!(
                    "--filter {text:?}: unknown key {key:?}; use one of {}",
                    keys.join(", ")
                );
            };
            match out.iter_mut().find(|(c, _)| *c == i) {
                Some((_, values)) => values.push(value.to_string()),
                None => out.push((i, vec![value.to_string()])),
            }
        }
        Ok(Filters(out))
    }

    fn keeps(&self, columns: &[Column], cells: &[String]) -> bool {
        self.0.iter().all(|(i, values)| {
            let cell = cells.get(*i).map(String::as_str).unwrap_or("");
            values.iter().any(|v| {
                if columns[*i].key == "name" {
                    cell.starts_with(v.as_str())
                } else {
                    cell == v
                }
            })
        })
    }
}

/// A template's pieces: text, and fields by column index; `{{json .}}` is the row's JSON.
enum Piece {
    Text(String),
    Field(usize),
    Json,
}

fn compile(template: &str, columns: &[Column]) -> Result<Vec<Piece>> {
    let fields = || {
        columns
            .iter()
            .map(|c| format!("{{{{.{}}}}}", title(c.key)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut pieces = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        pieces.push(Piece::Text(unescape(&rest[..start])));
        let Some(len) = rest[start..].find("}}") else {
            bail!("--format {template:?}: a {{{{ has no closing }}}}");
        };
        let inner = rest[start + 2..start + len].trim();
        if inner == "json ." {
            pieces.push(Piece::Json);
        } else {
            let Some(field) = inner.strip_prefix('.') else {
                bail!(
                    "--format {template:?}: {{{{{inner}}}}} is not a field; use {}",
                    fields()
                );
            };
            let want = field.to_ascii_lowercase();
            let Some(i) = columns.iter().position(|c| c.key.replace('_', "") == want) else {
                bail!(
                    "--format {template:?}: no field {field:?}; use {}",
                    fields()
                );
            };
            pieces.push(Piece::Field(i));
        }
        rest = &rest[start + len + 2..];
    }
    pieces.push(Piece::Text(unescape(rest)));
    Ok(pieces)
}

/// `\t` and `\n` as written on a command line.
fn unescape(s: &str) -> String {
    s.replace("\\t", "\t").replace("\\n", "\n")
}

/// `client_ip` → `ClientIp`, the field name a template uses.
fn title(key: &str) -> String {
    key.split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// Prints `rows` as `format` and `args` ask.
pub fn print<T: Serialize>(
    format: &Format,
    args: &ListArgs,
    columns: &[Column],
    rows: Vec<Row<T>>,
) -> Result<()> {
    let filters = Filters::parse(&args.filter, columns)?;
    let rows: Vec<Row<T>> = rows
        .into_iter()
        .filter(|r| filters.keeps(columns, &r.cells))
        .collect();
    if args.quiet {
        for r in &rows {
            println!("{}", r.cells.first().map(String::as_str).unwrap_or(""));
        }
        return Ok(());
    }
    match format {
        Format::Json => {
            let values: Vec<&T> = rows.iter().map(|r| &r.value).collect();
            println!("{}", serde_json::to_string_pretty(&values)?);
        }
        Format::Template(t) => {
            let pieces = compile(t, columns)?;
            for r in &rows {
                let mut line = String::new();
                for p in &pieces {
                    match p {
                        Piece::Text(s) => line.push_str(s),
                        Piece::Field(i) => line.push_str(r.cells.get(*i).map_or("", |c| c)),
                        Piece::Json => line.push_str(&serde_json::to_string(&r.value)?),
                    }
                }
                println!("{line}");
            }
        }
        Format::Table => {
            let headers: Vec<&str> = columns.iter().map(|c| c.header).collect();
            let cells: Vec<Vec<String>> = rows
                .into_iter()
                .map(|mut r| {
                    if r.marked
                        && let Some(first) = r.cells.first_mut()
                    {
                        first.push_str(" *");
                    }
                    r.cells
                })
                .collect();
            print!("{}", table(&headers, &cells));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const COLUMNS: [Column; 3] = [
        col("NAME", "name"),
        col("MODE", "mode"),
        col("CLIENT IP", "client_ip"),
    ];

    fn cells(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn filters_match_a_name_prefix_or_whole_values_and_name_their_errors() {
        let f = Filters::parse(&cells(&["name=we", "mode=vip", "mode=dnsrr"]), &COLUMNS).unwrap();
        assert!(f.keeps(&COLUMNS, &cells(&["web", "vip", "any"])));
        assert!(f.keeps(&COLUMNS, &cells(&["web2", "dnsrr", "any"])));
        assert!(!f.keeps(&COLUMNS, &cells(&["api", "vip", "any"])));
        let f = Filters::parse(&cells(&["mode=vi"]), &COLUMNS).unwrap();
        assert!(
            !f.keeps(&COLUMNS, &cells(&["web", "vip", "any"])),
            "whole values"
        );
        let e = Filters::parse(&cells(&["color=red"]), &COLUMNS)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown key \"color\"") && e.contains("name, mode, client_ip"),
            "{e}"
        );
        let e = Filters::parse(&cells(&["web"]), &COLUMNS)
            .unwrap_err()
            .to_string();
        assert!(e.contains("key=value"), "{e}");
    }

    #[test]
    fn templates_name_fields_by_their_keys_and_refuse_unknown_ones() {
        let p = compile("{{.Name}}\\t{{ .ClientIp }}", &COLUMNS).unwrap();
        let row = cells(&["web", "vip", "keep"]);
        let mut line = String::new();
        for piece in &p {
            match piece {
                Piece::Text(s) => line.push_str(s),
                Piece::Field(i) => line.push_str(&row[*i]),
                Piece::Json => {}
            }
        }
        assert_eq!(line, "web\tkeep");
        let e = compile("{{.Colour}}", &COLUMNS).err().unwrap().to_string();
        assert!(
            e.contains("no field \"Colour\"") && e.contains("{{.ClientIp}}"),
            "{e}"
        );
        assert!(compile("{{.Name", &COLUMNS).is_err());
        assert!(compile("{{Name}}", &COLUMNS).is_err());
    }
}

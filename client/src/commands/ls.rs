//! `hashgrid ls SNAPSHOT [PATH]`: the entries of a snapshot, depth-first in name order.

use std::path::{Component, PathBuf};

use futures::future::BoxFuture;
use futures::FutureExt;
use hashgrid_proto::manifest::{Entry, EntryKind, Tree};

use super::{format_time, outln, Global, SnapshotFilter};
use crate::error::ClientError;
use crate::objects::ObjectReader;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Snapshot id, or `latest` (of --client / --dataset).
    pub snapshot: String,
    /// Only this path inside the snapshot and what is below it.
    pub path: Option<PathBuf>,
    /// Long format: type and mode, owner, size, mtime.
    #[arg(short, long)]
    pub long: bool,
    #[command(flatten)]
    pub filter: SnapshotFilter,
}

fn type_char(k: &EntryKind) -> char {
    match k {
        EntryKind::File { .. } => '-',
        EntryKind::Dir { .. } => 'd',
        EntryKind::Symlink { .. } => 'l',
        EntryKind::Fifo => 'p',
        EntryKind::Socket => 's',
        EntryKind::CharDevice { .. } => 'c',
        EntryKind::BlockDevice { .. } => 'b',
    }
}

fn mode_string(k: &EntryKind, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(type_char(k));
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        s.push(if mode & (0o400 >> i) != 0 { c } else { '-' });
    }
    s
}

fn print_entry(path: &[u8], e: &Entry, long: bool, json: bool) {
    let p = String::from_utf8_lossy(path);
    if json {
        let v = serde_json::json!({
            "path": p,
            "type": type_char(&e.kind).to_string(),
            "mode": e.meta.mode,
            "uid": e.meta.uid,
            "gid": e.meta.gid,
            "size": e.meta.size,
            "mtime": format_time(e.meta.mtime.sec.saturating_mul(1000)),
        });
        outln!("{v}");
    } else if long {
        let target = match &e.kind {
            EntryKind::Symlink { target } => format!(" -> {}", String::from_utf8_lossy(target)),
            _ => String::new(),
        };
        outln!(
            "{} {:>6} {:>6} {:>12} {} {p}{target}",
            mode_string(&e.kind, e.meta.mode),
            e.meta.uid,
            e.meta.gid,
            e.meta.size,
            format_time(e.meta.mtime.sec.saturating_mul(1000)),
        );
    } else {
        outln!("{p}");
    }
}

pub async fn run(global: &Global, args: &Args) -> anyhow::Result<()> {
    let conn = global.connect().await?;
    let snapshot = args.filter.resolve(&conn, &args.snapshot).await?;
    let reader = ObjectReader::new(conn);
    let mut tree = reader.load_tree(&snapshot.root).await?;
    let mut prefix = Vec::new();
    // Walk down to the requested path.
    if let Some(path) = &args.path {
        let comps: Vec<&[u8]> = path
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.as_encoded_bytes()),
                _ => None,
            })
            .collect();
        for (i, c) in comps.iter().enumerate() {
            let entry = tree.get(c).cloned().ok_or_else(|| {
                ClientError::NotFound(format!(
                    "{} is not in snapshot {}",
                    path.display(),
                    snapshot.id
                ))
            })?;
            prefix.push(b'/');
            prefix.extend_from_slice(c);
            print_entry(&prefix, &entry, args.long, global.json);
            match entry.kind {
                EntryKind::Dir { subtree } => tree = reader.load_tree(&subtree).await?,
                _ if i + 1 == comps.len() => return Ok(()),
                _ => {
                    return Err(ClientError::NotFound(format!(
                        "{} is not a directory",
                        String::from_utf8_lossy(&prefix)
                    ))
                    .into())
                }
            }
        }
    }
    list_tree(&reader, prefix, tree, args.long, global.json).await?;
    Ok(())
}

/// Prints `tree` depth-first: each directory, then its contents, then its next sibling.
fn list_tree<'a>(
    reader: &'a ObjectReader,
    prefix: Vec<u8>,
    tree: Tree,
    long: bool,
    json: bool,
) -> BoxFuture<'a, crate::Result<()>> {
    async move {
        for e in tree.entries {
            let mut path = prefix.clone();
            path.push(b'/');
            path.extend_from_slice(&e.name);
            print_entry(&path, &e, long, json);
            if let EntryKind::Dir { subtree } = &e.kind {
                let sub = reader.load_tree(subtree).await?;
                list_tree(reader, path, sub, long, json).await?;
            }
        }
        Ok(())
    }
    .boxed()
}

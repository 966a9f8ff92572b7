//! `segdump`: the stand-alone form of `ringbus segdump` for operators who only have
//! a segment file. Prints batches, CRC status and the index.

use std::path::PathBuf;

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os().skip(1);
    let mut records = false;
    let mut paths: Vec<PathBuf> = Vec::new();
    for a in args.by_ref() {
        if a == "--records" {
            records = true;
        } else if a == "--help" || a == "-h" {
            println!("usage: segdump [--records] SEGMENT.log...");
            return std::process::ExitCode::SUCCESS;
        } else {
            paths.push(a.into());
        }
    }
    if paths.is_empty() {
        eprintln!("usage: segdump [--records] SEGMENT.log...");
        return std::process::ExitCode::from(2);
    }
    for p in paths {
        match ringbus::storage::dump::dump_segment(&p, records) {
            Ok(t) => print!("{t}"),
            Err(e) => {
                eprintln!("segdump: {}: {e}", p.display());
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    std::process::ExitCode::SUCCESS
}

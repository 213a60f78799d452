//! The `meterd` binary: parse arguments and hand them to [`meterd::cli::main`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    meterd::cli::main(meterd::cli::Cli::parse())
}

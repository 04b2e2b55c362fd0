//! The `shardnet` binary: parse the command line and run. All the work is in the library.

fn main() {
    std::process::exit(shardnet::cli::main());
}

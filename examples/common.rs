// Shared by the comparison examples: the `--port P` argument.
#[allow(dead_code)]
pub fn port() -> u16 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--port")
        .and_then(|i| args.get(i + 1))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| {
            eprintln!("usage: {} --port P", args[0]);
            std::process::exit(2)
        })
}

//! What the benchmark's helper programs share.

/// The program's arguments, or `None` (after printing `usage`) when it was started without
/// any or with test-harness flags, as `cargo test --all-targets` starts every bench target.
pub fn args_or_usage(usage: &str, at_least: usize) -> Option<Vec<String>> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.len() < at_least || args.first().is_some_and(|a| a.starts_with("--")) {
        println!("usage: {usage}");
        return None;
    }
    Some(args)
}

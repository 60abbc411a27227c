use tunnel_delivery::{split, text_len};

/// Fence state by the simplest rule (a line starting with ``` toggles), independent of the
/// crate's parser; the generated texts only use plain ``` fences.
fn balanced(chunk: &str) -> bool {
    chunk
        .lines()
        .filter(|l| l.trim_start().starts_with("```"))
        .count()
        % 2
        == 0
}

/// Non-whitespace characters outside fence lines.
fn content(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("```"))
        .flat_map(|l| l.chars())
        .filter(|c| !c.is_whitespace())
        .collect()
}

fn check(text: &str, limit: usize) -> Vec<String> {
    let chunks = split(text, limit);
    for (i, c) in chunks.iter().enumerate() {
        assert!(
            text_len(c) <= limit,
            "chunk {i} has {} units > {limit}: {c:?}\nfrom {text:?}",
            text_len(c)
        );
        assert!(!c.trim().is_empty(), "blank chunk {i} from {text:?}");
        assert!(
            balanced(c),
            "chunk {i} has unbalanced fences: {c:?}\nall: {chunks:#?}\nfrom {text:?}"
        );
    }
    assert_eq!(
        content(&chunks.join("\n")),
        content(text),
        "content changed; limit {limit}\nchunks: {chunks:#?}\nfrom {text:?}"
    );
    chunks
}

fn answer_4000() -> String {
    let mut s = String::from("Here is the refactor you asked for. ");
    for i in 0..12 {
        s.push_str(&format!(
            "Sentence number {i} explains one more detail of the change. "
        ));
    }
    s.push_str("\n\n```rust\n");
    for i in 0..45 {
        s.push_str(&format!(
            "    let value_{i} = compute(\"input {i}\", {i}).await?;\n"
        ));
    }
    s.push_str("```\n\nAfter the block, a closing paragraph. ");
    while s.len() < 4000 {
        s.push_str("More words follow here. ");
    }
    s
}

#[test]
fn a_4000_char_answer_with_a_code_block_splits_with_balanced_fences_in_order() {
    let text = answer_4000();
    assert!((4000..4100).contains(&text.chars().count()));
    let chunks = check(&text, 2000);
    assert!(chunks.len() >= 3, "{chunks:#?}");
    // The block is cut: the chunk that ends inside it closes it, the next reopens it as rust.
    let cut = chunks
        .iter()
        .position(|c| c.contains("```rust") && c.trim_end().ends_with("```"))
        .expect("a chunk that closes the block");
    assert!(
        chunks[cut + 1].starts_with("```rust\n"),
        "{:?}",
        chunks[cut + 1]
    );
    // Cut at a line inside the block: each code line arrives whole.
    for c in &chunks {
        for l in c.lines().filter(|l| l.contains("let value_")) {
            assert!(l.ends_with(".await?;"), "code line cut: {l:?}");
        }
    }
    // Order kept: the code lines appear in sequence across chunks.
    let joined = chunks.concat();
    let mut last = 0;
    for i in 0..45 {
        let at = joined
            .find(&format!("let value_{i} "))
            .expect("every code line");
        assert!(at >= last);
        last = at;
    }
    assert!(chunks[0].starts_with("Here is the refactor"));
    assert!(chunks.last().unwrap().contains("More words follow here."));
}

#[test]
fn short_text_is_one_chunk_and_blank_text_none() {
    assert_eq!(split("hello", 2000), vec!["hello".to_owned()]);
    assert_eq!(split("  \n\n  ", 2000), Vec::<String>::new());
    assert_eq!(split("", 10), Vec::<String>::new());
}

#[test]
fn prefers_paragraph_then_line_then_space() {
    let para = format!("{}\n\n{}", "a ".repeat(30).trim(), "b ".repeat(30).trim());
    let c = split(&para, 80);
    assert_eq!(c.len(), 2);
    assert!(c[0].ends_with('a') && c[1].starts_with('b'), "{c:?}");

    let lines = format!("{}\n{}", "a ".repeat(30).trim(), "b ".repeat(30).trim());
    let c = split(&lines, 80);
    assert_eq!(c.len(), 2);
    assert!(c[0].ends_with('a') && c[1].starts_with('b'), "{c:?}");

    let words = "word ".repeat(100);
    for c in split(&words, 42) {
        assert!(c.split(' ').all(|w| w == "word"), "word broken: {c:?}");
    }
}

#[test]
fn only_a_word_longer_than_the_limit_is_cut_inside() {
    let long = "x".repeat(250);
    let text = format!("short words {long} and more");
    let chunks = check(&text, 100);
    assert_eq!(chunks[0], "short words");
    assert!(chunks.iter().any(|c| c == &"x".repeat(100)));
}

#[test]
fn counts_utf16_units_so_emoji_fit_both_platforms() {
    let text = "😀".repeat(1500); // 1500 code points, 3000 UTF-16 units
    let chunks = check(&text, 2000);
    assert_eq!(chunks.len(), 2);
    assert_eq!(chunks[0].chars().count(), 1000);
    assert_eq!(text_len("😀é"), 3);
}

#[test]
fn an_unclosed_fence_is_closed_and_fence_at_a_cut_is_not_reopened_empty() {
    let text = format!("intro\n```sh\n{}", "echo hi\n".repeat(40));
    let chunks = check(&text, 120);
    assert!(chunks.iter().skip(1).all(|c| c.starts_with("```sh\n")));
    // A block that ends exactly where a chunk ends does not produce an empty block.
    let text = format!("```\n{}\n```\nafter", "y".repeat(90));
    let chunks = check(&text, 100);
    assert!(chunks.iter().all(|c| c != "```\n```"), "{chunks:?}");
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

fn generate(rng: &mut Rng, limit: usize) -> String {
    let words = [
        "a",
        "the",
        "fn",
        "main()",
        "`x`",
        "é",
        "naïve",
        "日本語",
        "😀",
        "👩‍💻",
        "ok,",
        "x==y",
        "--flag",
        "**bold**",
        "<@123>",
        "@everyone",
    ];
    let mut s = String::new();
    let mut in_fence = false;
    let pieces = 1 + rng.below(120);
    for _ in 0..pieces {
        match rng.below(20) {
            0 => s.push_str("\n\n"),
            1..=3 => s.push('\n'),
            4 => {
                // A fence line at the start of a line.
                if !s.is_empty() && !s.ends_with('\n') {
                    s.push('\n');
                }
                if in_fence {
                    s.push_str("```\n");
                } else {
                    s.push_str(rng.pick(&["```", "```rust", "```sh", "```json"]));
                    s.push('\n');
                }
                in_fence = !in_fence;
            }
            5 => {
                // A word longer than or close to the limit.
                let n = rng.below(limit as u64 * 2) as usize + 1;
                s.push_str(&"w".repeat(n));
                s.push(' ');
            }
            6 => s.push_str("    indented "),
            _ => {
                s.push_str(rng.pick(&words));
                s.push(' ');
            }
        }
    }
    s
}

#[test]
fn property_many_generated_texts_split_within_limit_balanced_and_complete() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let limits = [16, 17, 20, 25, 33, 50, 64, 100, 257, 2000, 4096];
    let mut checked = 0;
    for round in 0..3000 {
        let limit = if round % 5 == 0 {
            limits[rng.below(limits.len() as u64) as usize]
        } else {
            16 + rng.below(300) as usize
        };
        let text = generate(&mut rng, limit);
        let chunks = check(&text, limit);
        if text_len(text.trim()) > limit {
            assert!(chunks.len() > 1);
        }
        checked += chunks.len();
    }
    assert!(checked > 3000);
}

/// Found by the `split` fuzz target (fuzz/regressions/split/): a fence of 8 backticks with a
/// limit of 16 made a 17-unit chunk, because its closing and reopening lines left no room for
/// text. Such a fence is now plain text, and every chunk is within the limit.
#[test]
fn a_fence_too_long_for_the_limit_is_plain_text() {
    let text = "\u{0}\u{0}\u{0}\u{4}\u{4}`\u{0}  \u{1}'\u{0}\u{4}\u{0}\u{4}\u{b}\n````````\n\n\u{2}`\u{f}\n`";
    for limit in [16, 17, 20] {
        for c in split(text, limit) {
            assert!(
                text_len(&c) <= limit,
                "{} units > {limit}: {c:?}",
                text_len(&c)
            );
        }
    }
    let long = format!("{0}\nx\n{0}", "`".repeat(40));
    for c in split(&long, 64) {
        assert!(text_len(&c) <= 64, "{} units: {c:?}", text_len(&c));
    }
}

/// Found by the `split` fuzz target: a cut just before backticks inside a line started the
/// next chunk with them, and the chat showed a code block the text never had. Cuts inside a
/// line now avoid the spot before backticks, and such backticks never open a fence.
#[test]
fn backticks_inside_a_line_never_start_a_chunk() {
    let text = "run it with ```cargo test -p tunnel``` and then ```cargo fmt``` before the commit \
                and also ```scripts/test``` at the end of the day";
    for limit in 16..60 {
        let chunks = check(text, limit);
        for c in &chunks {
            assert!(
                !c.trim_start().starts_with("```"),
                "limit {limit}: chunk starts with backticks: {c:?}\nall: {chunks:#?}"
            );
        }
    }
}

/// Found by the `split` fuzz target: with a limit of 17, a 7-backtick fence left room for one
/// unit of text, and a character of two UTF-16 units made an 18-unit chunk.
#[test]
fn a_fence_leaves_room_for_a_two_unit_character() {
    let text = "```````\n\u{9f5e8}\n\u{9f5e8}\n```````";
    for limit in 16..24 {
        for c in split(text, limit) {
            assert!(
                text_len(&c) <= limit,
                "{} units > {limit}: {c:?}",
                text_len(&c)
            );
        }
    }
}

/// Found by the `split` fuzz target: a fence line cut because nothing else fitted left the
/// fence state wrong (a blank piece judged by the next line), and a part ended inside a fence
/// without closing it.
#[test]
fn a_fence_line_after_a_forced_cut_keeps_parts_balanced() {
    let text = "``vvvvvv\u{1}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{1}vvvv\n\u{2}`vvvvvvvvAvvvvvvvvvvvvvvvvvvvvvfvvvv\u{1}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{1}vvvv        \u{b}\n2   @@@@@@@@@@@@@@@@@@@@@@@                         \n```ll\n\u{2}`\n``\n\n`";
    for c in split(text, 16) {
        assert!(text_len(&c) <= 16, "{c:?}");
        assert!(balanced(&c), "unbalanced: {c:?}");
    }
}

//! The demo task: extract a person's name, age and city from a sentence into one line of
//! JSON. Answers are exactly checkable, and the sentences vary in wording, order and
//! distracting numbers, so the model has to read them rather than copy a position.
//!
//! `cargo xtask demo-data` writes `data/demo/{train,val,test}.jsonl` (deterministic), and
//! `preferences.jsonl` / `preferences_val.jsonl` for DPO: the exact one-line JSON is
//! preferred over a verbose, wrapped, string-typed or wrong-age answer. The
//! test set uses first names and cities that never occur in training, and two sentence
//! templates held out of training, so its score measures extraction rather than memory.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

const FIRST: &[&str] = &[
    "Maria", "James", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tomas", "Fatima", "Noah",
    "Elena", "Kwame", "Sofia", "Liam", "Mei", "Ahmed", "Clara", "Ivan", "Nadia", "Lucas", "Hana",
    "Diego", "Zara", "Felix", "Amara", "Oskar", "Leila", "Mateo", "Ingrid", "Ravi", "Chloe",
    "Yusuf", "Greta", "Pablo", "Anya", "Emeka", "Julia", "Kenji", "Rosa", "Samuel", "Freya",
    "Hugo", "Layla", "Marco", "Nina", "Arjun", "Elsa", "Tariq", "Vera", "Hiro",
];
/// First names only the test set uses.
const FIRST_TEST: &[&str] = &[
    "Beatriz", "Dmitri", "Esther", "Kofi", "Mirela", "Soren", "Yara", "Anselm", "Leona", "Teodor",
];
const LAST: &[&str] = &[
    "Lopez", "Smith", "Tanaka", "Haddad", "Fischer", "Silva", "Sharma", "Novak", "Rahman", "Brown",
    "Petrova", "Mensah", "Rossi", "Walsh", "Chen", "Karimi", "Dubois", "Ivanov", "Kowalski",
    "Moreau", "Sato", "Garcia", "Okafor", "Berg", "Nguyen", "Larsen", "Costa", "Meyer", "Ali",
    "Jensen",
];
const CITIES: &[&str] = &[
    "Lisbon", "Osaka", "Nairobi", "Toronto", "Berlin", "Lima", "Mumbai", "Prague", "Dhaka",
    "Dublin", "Kyiv", "Accra", "Milan", "Seattle", "Shanghai", "Tehran", "Lyon", "Kazan", "Krakow",
    "Nantes", "Sapporo", "Seville", "Lagos", "Bergen", "Hanoi", "Aarhus", "Porto", "Hamburg",
    "Cairo", "Oslo", "Denver", "Quito", "Madrid", "Vienna", "Chennai", "Manila", "Boston",
    "Athens", "Zurich", "Santiago",
];
/// Cities only the test set uses.
const CITIES_TEST: &[&str] = &[
    "Valencia", "Bordeaux", "Montreal", "Tbilisi", "Adelaide", "Cordoba", "Gdansk", "Kampala",
];
const JOBS: &[&str] = &[
    "nurse",
    "engineer",
    "teacher",
    "baker",
    "pilot",
    "lawyer",
    "carpenter",
    "chemist",
    "painter",
    "librarian",
];

/// Sentence templates: `{n}` name, `{a}` age, `{c}` city, `{j}` a job, `{x}` a small
/// distracting number.
const TEMPLATES: &[&str] = &[
    "{n}, {a}, lives in {c}.",
    "{n} is {a} years old and lives in {c}.",
    "Last spring, {a}-year-old {n} moved to {c}.",
    "In {c}, I met {n}, who is {a} years old.",
    "{n} ({a}) works as a {j} in {c}.",
    "Meet {n}: {a} years old, a {j} from {c}.",
    "Born {a} years ago, {n} now calls {c} home.",
    "The {j} {n}, aged {a}, has lived in {c} for {x} years.",
    "{c} is where {n} lives; {n} turned {a} this year.",
    "Our new neighbour in {c} is {n}, a {a}-year-old {j}.",
    "At {a}, {n} opened a small shop in {c} with {x} friends.",
    "{n} from {c} celebrated turning {a} with {x} guests.",
    "After {x} years abroad, {n} ({a}) returned to {c}.",
    "Name: {n}. Age: {a}. Home town: {c}.",
    "Yesterday {n}, a {j} aged {a}, flew back to {c}.",
    "{n} has {x} cats, is {a}, and lives in {c}.",
];
/// Templates only the test set uses.
const TEMPLATES_TEST: &[&str] = &[
    "Everyone in {c} knows {n}, the {a}-year-old {j}.",
    "{n}, who is {a}, rents a flat in {c} with {x} roommates.",
];

const INSTRUCTION: &str = "Extract the person's name, age and city from the sentence. \
Answer with one line of JSON with the keys \"name\", \"age\" and \"city\".";

/// SplitMix64, as the data order of peft-train.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[(self.next() % xs.len() as u64) as usize]
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// One example's parts: the prompt, the exact answer, and the fields (for verbose or
/// wrong answers).
struct Parts {
    prompt: String,
    completion: String,
    name: String,
    age: u64,
    city: String,
    distractor: u64,
}

fn example(rng: &mut Rng, first: &[&str], cities: &[&str], templates: &[&str]) -> String {
    let p = parts(rng, first, cities, templates);
    serde_json::json!({"prompt": p.prompt, "completion": p.completion}).to_string()
}

/// A preference pair: the exact one-line JSON is preferred over a verbose, wrapped or
/// subtly wrong answer.
fn preference(rng: &mut Rng) -> String {
    let p = parts(rng, FIRST, CITIES, TEMPLATES);
    let (name, age, city) = (&p.name, p.age, &p.city);
    let rejected = match rng.next() % 4 {
        0 => format!(
            "Sure! Here is the extracted information:\n```json\n{}\n```",
            p.completion
        ),
        1 => format!(
            "The person's name is {name}, they are {age} years old, and they live in {city}."
        ),
        2 => format!("{{\"name\": \"{name}\", \"age\": \"{age}\", \"city\": \"{city}\"}}"),
        _ => format!(
            "{{\"name\": \"{name}\", \"age\": {}, \"city\": \"{city}\"}}",
            p.distractor
        ),
    };
    serde_json::json!({"prompt": p.prompt, "chosen": p.completion, "rejected": rejected})
        .to_string()
}

fn parts(rng: &mut Rng, first: &[&str], cities: &[&str], templates: &[&str]) -> Parts {
    let name = format!("{} {}", rng.pick(first), rng.pick(LAST));
    let age = rng.range(18, 89);
    let city = rng.pick(cities);
    // A distracting number that differs from the age.
    let mut x = rng.range(2, 15);
    if x == age {
        x += 1;
    }
    let sentence = rng
        .pick(templates)
        .replace("{n}", &name)
        .replace("{a}", &age.to_string())
        .replace("{c}", city)
        .replace("{j}", rng.pick(JOBS))
        .replace("{x}", &x.to_string());
    let prompt = format!("{INSTRUCTION}\n\nSentence: {sentence}");
    // The format a JSON serialiser with ", " and ": " separators writes (Python's json.dumps).
    let completion = format!("{{\"name\": \"{name}\", \"age\": {age}, \"city\": \"{city}\"}}");
    Parts {
        prompt,
        completion,
        name,
        age,
        city: city.to_string(),
        distractor: x,
    }
}

fn write(path: &Path, lines: &[String]) -> Result<()> {
    let mut text = String::new();
    for l in lines {
        let _ = writeln!(text, "{l}");
    }
    std::fs::write(path, text)?;
    Ok(())
}

/// Writes the demo's train, validation and test sets into `dir`.
pub fn generate(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut rng = Rng(20_261_125);
    let train: Vec<String> = (0..1200)
        .map(|_| example(&mut rng, FIRST, CITIES, TEMPLATES))
        .collect();
    let val: Vec<String> = (0..40)
        .map(|_| example(&mut rng, FIRST, CITIES, TEMPLATES))
        .collect();
    let all_templates: Vec<&str> = TEMPLATES.iter().chain(TEMPLATES_TEST).copied().collect();
    let test: Vec<String> = (0..60)
        .map(|i| {
            // A third of the test set in templates never trained on.
            let templates: &[&str] = if i % 3 == 0 {
                TEMPLATES_TEST
            } else {
                &all_templates
            };
            example(&mut rng, FIRST_TEST, CITIES_TEST, templates)
        })
        .collect();
    let preferences: Vec<String> = (0..320).map(|_| preference(&mut rng)).collect();
    write(&dir.join("train.jsonl"), &train)?;
    write(&dir.join("preferences.jsonl"), &preferences[..300])?;
    write(&dir.join("preferences_val.jsonl"), &preferences[300..])?;
    write(&dir.join("val.jsonl"), &val)?;
    write(&dir.join("test.jsonl"), &test)?;
    println!(
        "wrote {} training, {} validation and {} test examples and {} preference pairs to {}",
        train.len(),
        val.len(),
        test.len(),
        preferences.len(),
        dir.display()
    );
    Ok(())
}

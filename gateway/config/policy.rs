//! Policy files: every policy of every file, judged on its own, so each broken one is
//! reported and none hides another.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use turnpike_core::limits::{BucketSpec, Mode, Policy};
use turnpike_core::units::parse_duration;

use super::errors::{ConfigError, Report};
use super::files::{parse_yaml, without_location, Source};
use super::spec::{BucketFileSpec, ModeSpec, PolicyFile, PolicySpec};

/// The largest `burst × per` (in milliseconds) a bucket may hold: 2^53, below which the
/// Redis scripts' doubles count every unit exactly.
const MAX_BUCKET_UNITS: u128 = 1 << 53;

/// The policies of a directory, merged.
#[derive(Default)]
pub struct PolicySet {
    pub policies: HashMap<String, Arc<Policy>>,
    /// Every name defined, valid or not: a reference to a broken policy is not an error too.
    pub names: HashSet<String>,
}

/// Compiles every policy of `files`; a name defined twice is an error.
pub fn compile_files(files: &[Source], errors: &mut Vec<ConfigError>) -> PolicySet {
    let mut set = PolicySet::default();
    for file in files {
        match parse_yaml::<PolicyFile>(file) {
            Ok(parsed) => {
                let mut report = Report::new(&file.path, &file.text, errors);
                for (name, spec) in parsed.policies {
                    if set.claim(&name, &mut report) {
                        set.compile(name, spec, &mut report);
                    }
                }
            }
            Err(first) => set.compile_each(file, first, errors),
        }
    }
    set
}

impl PolicySet {
    /// Takes `name` for a policy; a name defined twice is reported and not taken again.
    fn claim(&mut self, name: &str, report: &mut Report) -> bool {
        let fresh = self.names.insert(name.to_owned());
        if !fresh {
            report.error(format!("policies.{name}"), "policy defined twice");
        }
        fresh
    }

    fn compile(&mut self, name: String, spec: PolicySpec, report: &mut Report) {
        if let Some(policy) = compile(&name, spec, report) {
            self.policies.insert(name, Arc::new(policy));
        }
    }

    /// A file that did not parse as a whole: each policy is judged on its own, the first
    /// broken one with the parser's exact position (`first`), the others at their name.
    fn compile_each(&mut self, file: &Source, first: ConfigError, errors: &mut Vec<ConfigError>) {
        #[derive(serde::Deserialize)]
        struct Loose {
            #[serde(default)]
            policies: serde_yaml_ng::Mapping,
        }
        let Ok(loose) = serde_yaml_ng::from_str::<Loose>(&file.text) else {
            // Not YAML (`first` says where); its policies' names are unknown.
            errors.push(first);
            return;
        };
        let mut first = Some(first);
        let mut report = Report::new(&file.path, &file.text, errors);
        for (name, value) in loose.policies {
            let Some(name) = name.as_str() else { continue };
            if !self.claim(name, &mut report) {
                continue;
            }
            match serde_yaml_ng::from_value::<PolicySpec>(value) {
                Ok(spec) => self.compile(name.to_owned(), spec, &mut report),
                Err(e) => match first.take() {
                    Some(first) => report.errors.push(first),
                    None => {
                        report.error(format!("policies.{name}"), without_location(e.to_string()))
                    }
                },
            }
        }
        report.errors.extend(first);
    }
}

/// One policy, or `None` after reporting every problem it has.
fn compile(name: &str, spec: PolicySpec, report: &mut Report) -> Option<Policy> {
    let requests = bucket(&format!("policies.{name}.requests"), spec.requests, report);
    let tokens = bucket(&format!("policies.{name}.tokens"), spec.tokens, report);
    if spec.concurrency == Some(0) {
        report.error(
            format!("policies.{name}.concurrency"),
            "must be a positive integer",
        );
        return None;
    }
    Some(Policy {
        name: name.to_owned(),
        requests: requests.ok()?,
        tokens: tokens.ok()?,
        concurrency: spec.concurrency,
        mode: match spec.mode {
            ModeSpec::Enforce => Mode::Enforce,
            ModeSpec::Shadow => Mode::Shadow,
        },
    })
}

fn bucket(
    key: &str,
    spec: Option<BucketFileSpec>,
    report: &mut Report,
) -> Result<Option<BucketSpec>, ()> {
    let Some(spec) = spec else { return Ok(None) };
    let period = parse_duration(&spec.per).map_err(|m| report.error(format!("{key}.per"), m));
    if spec.rate == 0 {
        report.error(format!("{key}.rate"), "must be a positive integer");
    }
    if spec.burst == Some(0) {
        report.error(format!("{key}.burst"), "must be a positive integer");
    }
    let period = period?;
    if spec.rate == 0 || spec.burst == Some(0) {
        return Err(());
    }
    let bucket = BucketSpec {
        rate: spec.rate,
        period_ms: period.as_millis() as u64,
        burst: spec.burst.unwrap_or(spec.rate),
    };
    let units = bucket.burst as u128 * bucket.period_ms as u128;
    if units > MAX_BUCKET_UNITS {
        // Redis counts in doubles, exact only below 2^53; both stores keep to that.
        let field = if spec.burst.is_some() {
            "burst"
        } else {
            "rate"
        };
        report.error(
            format!("{key}.{field}"),
            format!(
                "burst × per is {units} token-milliseconds; it must be at most 2^53 ({MAX_BUCKET_UNITS})"
            ),
        );
        return Err(());
    }
    Ok(Some(bucket))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_too_large_to_count_exactly_is_refused() {
        let compile = |per: &str, burst: u64| {
            let text =
                format!("policies:\n  p:\n    requests: {{rate: 1, per: {per}, burst: {burst}}}\n");
            let mut errors = Vec::new();
            let set = compile_files(&[Source::new("p.yaml", text)], &mut errors);
            (set.policies.contains_key("p"), errors.len())
        };
        // 2^53 ms-tokens is the most: 3,474,999 tokens per 30 days fit, one more does not.
        assert_eq!(compile("720h", 3_474_999), (true, 0));
        assert_eq!(compile("720h", 3_475_000), (false, 1));
    }

    #[test]
    fn every_broken_policy_of_a_file_is_reported_and_each_name_is_known() {
        let text = "policies:\n  a: {requests: {rate: 1, per: 1s, extra: 1}}\n  b: {concurrency: 0}\n  c: {nonsense: 1}\n  d: {requests: {rate: 1, per: 1s}}\n";
        let mut errors = Vec::new();
        let set = compile_files(&[Source::new("p.yaml", text)], &mut errors);
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert_eq!(&keys[1..], ["policies.b.concurrency", "policies.c"]);
        assert_eq!(set.policies.len(), 1, "only d compiles");
        assert!(["a", "b", "c", "d"].iter().all(|n| set.names.contains(*n)));
    }
}

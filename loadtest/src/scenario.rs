//! Scenarios: one TOML file each in `loadtest/scenarios/`.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// One rate for a while; baselines measured alongside.
    Steady,
    /// Several phases of different rates; the pool is sampled throughout.
    Step,
    /// All requests at once on an idle pool.
    Burst,
    /// Each client has its own session key (oha cannot vary headers).
    Sessions,
    /// Closed-loop levels of rising concurrency (one phase each), with CPU
    /// per call and a bwrap baseline at every level.
    Saturation,
    /// Far more clients than the pool can serve: every answer must be a
    /// 200 or a 429 with Retry-After, and /healthz must keep answering.
    Overload,
    /// Closed-loop clients at a concurrency the host serves (one oha level
    /// per phase): every answer must be a 200, no 429 (the quick profile
    /// runs the levels up to 4, for at most 10 s each).
    ClosedLoop,
    /// One call at a time to an image whose pool has shrunk to nothing but
    /// whose template is made (the scenario's `warm_up` made it): the time
    /// of a VM restored on demand.
    FirstCall,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    #[serde(default, with = "humantime_serde")]
    pub duration: Option<Duration>,
    pub requests: Option<u64>,
    /// Requests per second over all connections; none means as fast as possible.
    pub rate: Option<f64>,
    pub concurrency: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub kind: Kind,
    pub path: String,
    pub body: String,
    #[serde(default = "json")]
    pub content_type: String,
    /// What the bwrap and host baselines run (`sh -c`); none: no baselines.
    pub host_command: Option<String>,
    /// Working directory of the baselines, relative to the repository.
    pub host_cwd: Option<String>,
    /// Stdin of the baselines' command.
    #[serde(default)]
    pub host_stdin: String,
    /// Also measure a pool-disabled server (a cold VM per request).
    #[serde(default)]
    pub cold_vm: bool,
    /// Requests sent one after another before the phases, not measured (an
    /// image's first call makes its template).
    #[serde(default)]
    pub warm_up: u32,
    /// The image whose pool a `first-call` scenario watches.
    pub image: Option<String>,
    pub phases: Vec<Phase>,
}

fn json() -> String {
    "application/json".into()
}

/// How long and how hard: `full` as written, `quick` (inside `make test`)
/// a few seconds a scenario, only to prove the suite still works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Profile {
    Quick,
    Full,
}

impl Phase {
    pub fn scaled(&self, profile: Profile) -> Phase {
        match profile {
            Profile::Full => self.clone(),
            Profile::Quick => Phase {
                duration: self.duration.map(|d| d.min(Duration::from_secs(3))),
                requests: self.requests.map(|n| n.min(6)),
                rate: self.rate,
                concurrency: self.concurrency.min(4),
            },
        }
    }
}

impl Scenario {
    /// The phases this profile runs. A closed-loop scenario keeps, in the
    /// quick profile, its levels up to concurrency 4 at up to 10 s each: a
    /// level cut to 3 s would end before a queue forms.
    pub fn phases_for(&self, profile: Profile) -> Vec<Phase> {
        match (self.kind, profile) {
            (Kind::ClosedLoop, Profile::Quick) => self
                .phases
                .iter()
                .filter(|p| p.concurrency <= 4)
                .map(|p| Phase {
                    duration: p.duration.map(|d| d.min(Duration::from_secs(10))),
                    requests: p.requests.map(|n| n.min(30)),
                    ..p.clone()
                })
                .collect(),
            _ => self.phases.iter().map(|p| p.scaled(profile)).collect(),
        }
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        let s: Scenario = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim()))?;
        anyhow::ensure!(!s.phases.is_empty(), "{}: no phases", path.display());
        for p in &s.phases {
            anyhow::ensure!(
                p.duration.is_some() != p.requests.is_some(),
                "{}: each phase needs a duration or a number of requests",
                path.display()
            );
            anyhow::ensure!(p.concurrency >= 1, "{}: concurrency must be at least 1", path.display());
        }
        Ok(s)
    }

    /// Every scenario in `dir`, in name order.
    pub fn load_dir(dir: &Path) -> anyhow::Result<Vec<Self>> {
        let mut files: Vec<_> = std::fs::read_dir(dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        files.sort();
        files.iter().map(|p| Self::load(p)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_scenarios_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let all = Scenario::load_dir(&dir).unwrap();
        let kinds: Vec<Kind> = all.iter().map(|s| s.kind).collect();
        for k in [Kind::Steady, Kind::Step, Kind::Burst, Kind::Sessions, Kind::ClosedLoop] {
            assert!(kinds.contains(&k), "no {k:?} scenario");
        }
    }

    #[test]
    fn the_quick_profile_keeps_the_closed_loop_levels_up_to_four() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let s = Scenario::load(&dir.join("closed-loop-true.toml")).unwrap();
        let quick = s.phases_for(Profile::Quick);
        assert_eq!(quick.iter().map(|p| p.concurrency).collect::<Vec<_>>(), [1, 4]);
        assert_eq!(quick[0].duration, Some(Duration::from_secs(10)));
        assert_eq!(quick[0].rate, None, "closed loop: as fast as the answers come");
        let full = s.phases_for(Profile::Full);
        assert_eq!(full.iter().map(|p| p.concurrency).collect::<Vec<_>>(), [1, 4, 8]);
    }

    #[test]
    fn bad_scenarios_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.toml");
        std::fs::write(
            &p,
            "name='x'\ndescription='d'\nkind='steady'\npath='/'\nbody=''\n[[phases]]\nconcurrency=1",
        )
        .unwrap();
        assert!(Scenario::load(&p).unwrap_err().to_string().contains("duration or a number"));
        std::fs::write(&p, "name='x'\nkind='wild'").unwrap();
        assert!(Scenario::load(&p).is_err());
    }
}

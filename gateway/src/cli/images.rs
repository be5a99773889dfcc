//! `ember images list|build|import`: the images the configuration knows
//! (the same file `ember serve` reads), built into the cache by their
//! recipes, or imported from a root filesystem tarball.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use ember_image::{Catalog, ImageInfo, ImageState};

#[derive(Debug, Subcommand)]
pub enum ImagesCommand {
    /// List every image: recipes (built, stale or unbuilt) and imported ones.
    List(ListArgs),
    /// Build images from their recipes (every recipe when none is named);
    /// a current image in the cache is reused.
    Build(BuildArgs),
    /// Make an image of a root filesystem tarball (`docker export`, a
    /// debootstrap tree packed with tar; plain or gzip): Ember adds its
    /// init, agent and user.
    Import(ImportArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// The configuration file `ember serve` reads ([images] dirs, limits).
    #[arg(long, env = "EMBER_CONFIG")]
    pub config: Option<PathBuf>,
    /// The images directory.
    #[arg(long, env = "EMBER_IMAGES", default_value_os_t = ember_image::default_images_dir())]
    pub images: PathBuf,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// One JSON object per image instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// Images to build (default: every recipe the configuration knows).
    pub names: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// The new image's name.
    pub name: String,
    /// The root filesystem tarball.
    pub tarball: PathBuf,
}

fn catalog(cfg: &ConfigArgs) -> anyhow::Result<Catalog> {
    let config = crate::config::load_or_exit(cfg.config.as_deref(), &cfg.images);
    Catalog::load(config.images).map_err(|p| anyhow::anyhow!("{}", p.join("\n")))
}

fn size(bytes: u64) -> String {
    format!("{:.0} MB", bytes as f64 / 1e6)
}

fn describe(info: &ImageInfo) -> String {
    format!("{} in {:.0} s, {}", size(info.rootfs_bytes), info.build_secs, info.hash)
}

pub async fn run(cmd: ImagesCommand) -> anyhow::Result<ExitCode> {
    // Interrupted, a build's process group gets SIGTERM (the future is
    // dropped) and its script unmounts and removes what it made.
    tokio::select! {
        r = run_command(cmd) => r,
        () = crate::serve::shutdown_signal() => {
            eprintln!("ember: interrupted; the build in progress stops and cleans up");
            Ok(ExitCode::from(130))
        }
    }
}

async fn run_command(cmd: ImagesCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ImagesCommand::List(a) => list(a),
        ImagesCommand::Build(a) => build(a).await,
        ImagesCommand::Import(a) => {
            let c = catalog(&a.cfg)?;
            let info = c.import(&a.name, &a.tarball).await?;
            println!("imported {}: {}", info.name, describe(&info));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn list(a: ListArgs) -> anyhow::Result<ExitCode> {
    let c = catalog(&a.cfg)?;
    if !a.json {
        println!("{:<16} {:<8} {:<7} {:>8}  DESCRIPTION", "NAME", "STATE", "SOURCE", "SIZE");
    }
    for name in c.names() {
        let state = c.state(&name)?;
        let (word, info) = match &state {
            ImageState::Built(i) => ("built", Some(i.as_ref())),
            ImageState::Stale(i) => ("stale", Some(i.as_ref())),
            ImageState::Unbuilt => ("unbuilt", None),
        };
        let source = if c.recipe(&name).is_some() { "recipe" } else { "import" };
        let description = info
            .map(|i| i.description.clone())
            .or_else(|| c.recipe(&name).map(|r| r.description.clone()))
            .unwrap_or_default();
        if a.json {
            let line = serde_json::json!({
                "name": name,
                "state": word,
                "source": source,
                "description": description,
                "image": info,
            });
            println!("{line}");
        } else {
            let bytes = info.map(|i| size(i.rootfs_bytes)).unwrap_or_else(|| "-".into());
            println!("{name:<16} {word:<8} {source:<7} {bytes:>8}  {description}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn build(a: BuildArgs) -> anyhow::Result<ExitCode> {
    let c = catalog(&a.cfg)?;
    let names: Vec<String> = if a.names.is_empty() {
        c.names().into_iter().filter(|n| c.recipe(n).is_some()).collect()
    } else {
        a.names.clone()
    };
    let mut failed = 0;
    for name in &names {
        if c.recipe(name).is_none() {
            // Unknown, or imported (nothing to build from).
            let why = match c.state(name) {
                Ok(_) => format!("image {name} was imported; it has no recipe to build"),
                Err(e) => e.to_string(),
            };
            eprintln!("ember: {why}");
            failed += 1;
            continue;
        }
        if let Ok(ImageState::Built(info)) = c.state(name) {
            println!("{name}: up to date ({})", describe(&info));
            continue;
        }
        eprintln!("ember: building image {name} ...");
        match c.build(name).await.with_context(|| format!("image {name}")) {
            Ok(info) => println!("{name}: built ({})", describe(&info)),
            Err(e) => {
                eprintln!("ember: {e:#}");
                failed += 1;
            }
        }
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

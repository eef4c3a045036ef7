//! The mount(8) interface: `mount -t s3bridge BUCKET[:PREFIX] DIR -o OPTIONS`, an `/etc/fstab`
//! line of type `s3bridge`, and `-t fuse.s3bridge` through `mount.fuse3`.
//!
//! mount(8) runs `/sbin/mount.s3bridge SOURCE DIR [-sfnv] [-N NS] [-o OPTIONS]` (a link to
//! this binary); `mount.fuse3` runs `s3bridge SOURCE DIR -o OPTIONS`. Both arrive here and
//! become `s3bridge mount SOURCE DIR --option ...`: each `name=value` is the long option
//! `--name value` with `_` read as `-` (`cache_dir=/var/cache/x` is `--cache-dir /var/cache/x`)
//! and each bare `name` is `--name`, so every command-line option works in fstab form and
//! clap reports a misspelt one. A few names follow mount's own conventions (`ro`,
//! `endpoint`), and the generic ones mount and systemd use for themselves are dropped.

use std::ffi::OsString;

/// Options that are mount's or systemd's own business, not s3bridge's.
const IGNORED: &[&str] = &[
    "rw", "defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail", "dev",
    "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime", "relatime", "async", "sync",
];

/// Whether this invocation comes from mount(8) or mount.fuse3 rather than a person: the
/// program is called `mount.s3bridge`, or its first argument is not one of `subcommands` nor
/// an option while a second one (the mount point) follows.
pub fn is_mount_helper(args: &[OsString], subcommands: &[&str]) -> bool {
    let program = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("");
    if program.starts_with("mount.") {
        return true;
    }
    let first = args.get(1).and_then(|a| a.to_str()).unwrap_or("-");
    let subcommand = subcommands.contains(&first);
    !subcommand && !first.starts_with('-') && args.len() >= 3
}

/// A mount helper invocation as `s3bridge mount ...` arguments, and the environment its
/// options set (`profile=`, `credentials=`).
pub struct Translated {
    /// The command line.
    pub args: Vec<OsString>,
    /// Variables to set before running it.
    pub env: Vec<(String, String)>,
}

/// What mount(8) asks for.
pub enum Invocation {
    /// A new mount: the `s3bridge mount ...` equivalent.
    Mount(Translated),
    /// `-o remount,...` of a mount that is there: only read-only or read-write can change
    /// (the kernel accepts nothing else for FUSE).
    Remount {
        /// Where it is mounted.
        mountpoint: std::path::PathBuf,
        /// `ro` (the last of `ro` and `rw` given), else `rw`.
        read_only: bool,
    },
}

/// The `s3bridge mount ...` equivalent of a mount helper invocation.
pub fn translate(args: &[OsString]) -> Result<Invocation, String> {
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        match arg.to_str() {
            Some("-o") => {
                let list = rest.next().ok_or("-o needs a list of options")?;
                options.extend(split_options(&list.to_string_lossy()));
            }
            // mount's own flags: fake, no mtab, sloppy, verbose; namespace and type.
            Some("-f" | "-n" | "-s" | "-v") => {}
            Some("-N" | "-t") => {
                rest.next();
            }
            Some(o) if o.starts_with("-o") => options.extend(split_options(&o[2..])),
            _ => positional.push(arg.clone()),
        }
    }
    let [source, mountpoint] = <[OsString; 2]>::try_from(positional).map_err(|p| {
        format!(
            "expected SOURCE and MOUNTPOINT from mount, got {} arguments",
            p.len()
        )
    })?;
    if options.iter().any(|o| o == "remount") {
        let read_only = options.iter().rev().find(|o| *o == "ro" || *o == "rw");
        return Ok(Invocation::Remount {
            mountpoint: mountpoint.into(),
            read_only: read_only.is_some_and(|o| o == "ro"),
        });
    }
    let mut out: Vec<OsString> = vec!["s3bridge".into(), "mount".into(), source, mountpoint];
    let mut env = Vec::new();
    for opt in options {
        let (name, value) = match opt.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (opt.clone(), None),
        };
        if IGNORED.contains(&name.as_str()) || name.starts_with("x-") || name == "comment" {
            continue;
        }
        match (name.as_str(), value) {
            ("ro", None) => out.push("--read-only".into()),
            ("profile", Some(v)) => env.push(("AWS_PROFILE".into(), v)),
            ("credentials", Some(v)) => env.push(("AWS_SHARED_CREDENTIALS_FILE".into(), v)),
            ("endpoint", Some(v)) => out.extend(["--endpoint-url".into(), v.into()]),
            (n, Some(v)) => out.extend([format!("--{}", n.replace('_', "-")).into(), v.into()]),
            (n, None) => out.push(format!("--{}", n.replace('_', "-")).into()),
        }
    }
    Ok(Invocation::Mount(Translated { args: out, env }))
}

/// Splits a mount option list at commas.
fn split_options(list: &str) -> impl Iterator<Item = String> + '_ {
    list.split(',')
        .filter(|o| !o.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn mount_and_fuse_invocations_are_recognised() {
        let subs = ["mount", "status"];
        let helper = |v: &[&str]| is_mount_helper(&os(v), &subs);
        assert!(helper(&["/sbin/mount.s3bridge", "b", "/mnt"]));
        assert!(helper(&["s3bridge", "b:p/", "/mnt", "-o", "ro"]));
        assert!(!helper(&["s3bridge", "mount", "b", "/mnt"]));
        assert!(!helper(&["s3bridge", "--help"]));
        assert!(!helper(&["s3bridge", "status", "/mnt"]));
    }

    fn mount(args: &[&str]) -> Translated {
        match translate(&os(args)).unwrap() {
            Invocation::Mount(t) => t,
            Invocation::Remount { .. } => panic!("{args:?} is no remount"),
        }
    }

    #[test]
    fn fstab_options_become_command_line_options() {
        let Translated { args, env } = mount(&[
            "/sbin/mount.s3bridge",
            "bucket:dir/",
            "/mnt/x",
            "-o",
            "rw,allow_other,uid=33,gid=33,file_mode=0640,_netdev,x-systemd.automount,endpoint=http://h:3900,cache_dir=/var/cache/x,write_back,credentials=/etc/s3bridge/creds",
            "-n",
        ]);
        let args: Vec<String> = args.iter().map(|a| a.to_string_lossy().into()).collect();
        assert_eq!(
            args,
            [
                "s3bridge",
                "mount",
                "bucket:dir/",
                "/mnt/x",
                "--allow-other",
                "--uid",
                "33",
                "--gid",
                "33",
                "--file-mode",
                "0640",
                "--endpoint-url",
                "http://h:3900",
                "--cache-dir",
                "/var/cache/x",
                "--write-back",
            ]
        );
        assert_eq!(
            env,
            [(
                "AWS_SHARED_CREDENTIALS_FILE".to_string(),
                "/etc/s3bridge/creds".to_string()
            )]
        );
        let ro = mount(&["mount.s3bridge", "b", "/m", "-oro"]);
        assert!(ro.args.contains(&OsString::from("--read-only")));
        assert!(translate(&os(&["mount.s3bridge", "b"])).is_err());
    }

    #[test]
    fn a_remount_changes_only_read_only_and_the_last_word_counts() {
        let remount = |opts: &str| match translate(&os(&["s3bridge", "b:p/", "/m", "-o", opts])) {
            Ok(Invocation::Remount {
                mountpoint,
                read_only,
            }) => {
                assert_eq!(mountpoint, std::path::Path::new("/m"));
                read_only
            }
            _ => panic!("{opts} is a remount"),
        };
        assert!(remount("remount,ro"));
        assert!(!remount("ro,nosuid,remount,rw"));
        assert!(remount("rw,allow_other,remount,ro"));
        assert!(!remount("remount"));
    }
}

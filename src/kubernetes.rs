//! Kubernetes API access, one client per cluster: the local cluster (in-cluster
//! service account or `--kubeconfig`) and one remote cluster per file in
//! `--remote-kubeconfigs` (file name = cluster id). The `clusterid` request
//! header selects the cluster; a missing or empty header means the local one.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};

/// Where the local cluster's API server and credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeSource {
    /// The pod's service account (`KUBERNETES_SERVICE_HOST` and the mounted token).
    InCluster,
    Kubeconfig(PathBuf),
}

impl fmt::Display for KubeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KubeSource::InCluster => f.write_str("in-cluster service account"),
            KubeSource::Kubeconfig(p) => write!(f, "kubeconfig {}", p.display()),
        }
    }
}

/// Kubernetes settings of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesConfig {
    pub local: KubeSource,
    /// Id of the local cluster (`--cluster-id`, istiod's `CLUSTER_ID`).
    pub cluster_id: String,
    pub remote_kubeconfigs: Option<PathBuf>,
    /// Audiences put in every TokenReview.
    pub token_audiences: Vec<String>,
    /// Longest wait for one API call (TokenReview) before the request fails
    /// with UNAVAILABLE.
    pub api_timeout: Duration,
    /// Longest a positive TokenReview is remembered (never past the token's exp).
    pub token_review_cache_ttl: Duration,
    /// Remote kubeconfigs may run credential plugins (`exec`, `auth-provider`).
    pub allow_remote_exec: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeSetupError {
    #[error("Kubernetes {source_}: {reason}")]
    Local { source_: KubeSource, reason: String },
    #[error("--remote-kubeconfigs {dir}: cannot read: {reason}")]
    RemoteDir { dir: PathBuf, reason: String },
    #[error("--remote-kubeconfigs {file}: {reason}")]
    Remote { file: PathBuf, reason: String },
    #[error(
        "--remote-kubeconfigs {file}: cluster id {id:?} is the local cluster's id (--cluster-id); remote clusters need other ids"
    )]
    RemoteIsLocal { file: PathBuf, id: String },
    #[error(
        "--remote-kubeconfigs {file}: user {user:?} has a credential plugin ({kind}), which would run a command with plugca's privileges; use a token or client certificate, or pass --allow-remote-kubeconfig-exec if the file is trusted"
    )]
    RemoteCredentialPlugin {
        file: PathBuf,
        user: String,
        kind: CredentialPlugin,
    },
}

/// A kubeconfig mechanism that runs code to get credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialPlugin {
    /// `users[].user.exec`: runs a command.
    Exec,
    /// `users[].user.auth-provider`: e.g. gcp, oidc (may run `cmd-path`).
    AuthProvider,
}

impl fmt::Display for CredentialPlugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CredentialPlugin::Exec => "users[].user.exec",
            CredentialPlugin::AuthProvider => "users[].user.auth-provider",
        })
    }
}

/// A cluster id a request claimed that no client exists for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "client claims to be in cluster {claimed:?}, but we only know about local cluster {local:?} and remote clusters [{remotes}]"
)]
pub struct UnknownCluster {
    pub claimed: String,
    pub local: String,
    pub remotes: String,
}

/// One client per known cluster.
#[derive(Clone)]
pub struct Clusters {
    local_id: String,
    clients: BTreeMap<String, kube::Client>,
}

impl fmt::Debug for Clusters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Clusters")
            .field("local", &self.local_id)
            .field("ids", &self.clients.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Clusters {
    /// Builds the clients. Reads files, but talks to no API server yet.
    pub async fn load(config: &KubernetesConfig) -> Result<Self, KubeSetupError> {
        let local = match &config.local {
            KubeSource::InCluster => kube::Config::incluster().map_err(|e| e.to_string()),
            KubeSource::Kubeconfig(path) => from_kubeconfig(path).await,
        }
        .and_then(|c| client(c, config.api_timeout))
        .map_err(|reason| KubeSetupError::Local {
            source_: config.local.clone(),
            reason,
        })?;
        let mut clients = BTreeMap::from([(config.cluster_id.clone(), local)]);
        if let Some(dir) = &config.remote_kubeconfigs {
            for (id, file) in remote_files(dir)? {
                if id == config.cluster_id {
                    return Err(KubeSetupError::RemoteIsLocal { file, id });
                }
                let c = remote_kubeconfig(&file, config.allow_remote_exec)?;
                let c = from_parsed_kubeconfig(c)
                    .await
                    .and_then(|c| client(c, config.api_timeout))
                    .map_err(|reason| KubeSetupError::Remote {
                        file: file.clone(),
                        reason,
                    })?;
                clients.insert(id, c);
            }
        }
        Ok(Clusters {
            local_id: config.cluster_id.clone(),
            clients,
        })
    }

    pub fn local_id(&self) -> &str {
        &self.local_id
    }

    /// Every known cluster id, local first.
    pub fn ids(&self) -> Vec<&str> {
        std::iter::once(self.local_id.as_str())
            .chain(self.remote_ids())
            .collect()
    }

    fn remote_ids(&self) -> impl Iterator<Item = &str> {
        self.clients
            .keys()
            .map(String::as_str)
            .filter(|id| *id != self.local_id)
    }

    /// The cluster a `clusterid` header value names: `None` or empty means local.
    pub fn resolve(&self, header: Option<&str>) -> Result<(&str, &kube::Client), UnknownCluster> {
        let id = match header {
            None | Some("") => self.local_id.as_str(),
            Some(id) => id,
        };
        self.clients
            .get_key_value(id)
            .map(|(k, c)| (k.as_str(), c))
            .ok_or_else(|| UnknownCluster {
                claimed: id.chars().take(128).collect(),
                local: self.local_id.clone(),
                remotes: self.remote_ids().collect::<Vec<_>>().join(", "),
            })
    }

    /// Every cluster with its client.
    pub fn all(&self) -> impl Iterator<Item = (&str, &kube::Client)> {
        self.clients.iter().map(|(k, c)| (k.as_str(), c))
    }
}

async fn from_kubeconfig(path: &Path) -> Result<kube::Config, String> {
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| e.to_string())?;
    from_parsed_kubeconfig(kubeconfig).await
}

/// Reads a remote cluster's kubeconfig and, unless `allow_exec`, refuses
/// every user entry with a credential plugin, before anything could run it
/// (istiod refuses them in remote secrets for the same reason: whoever can
/// write the Secret would run commands in the control plane). All users are
/// checked, not only the current context's.
pub fn remote_kubeconfig(path: &Path, allow_exec: bool) -> Result<Kubeconfig, KubeSetupError> {
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| KubeSetupError::Remote {
        file: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if !allow_exec {
        for user in &kubeconfig.auth_infos {
            let Some(info) = &user.auth_info else {
                continue;
            };
            let kind = if info.exec.is_some() {
                CredentialPlugin::Exec
            } else if info.auth_provider.is_some() {
                CredentialPlugin::AuthProvider
            } else {
                continue;
            };
            return Err(KubeSetupError::RemoteCredentialPlugin {
                file: path.to_path_buf(),
                user: user.name.chars().take(128).collect(),
                kind,
            });
        }
    }
    Ok(kubeconfig)
}

async fn from_parsed_kubeconfig(kubeconfig: Kubeconfig) -> Result<kube::Config, String> {
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| e.to_string())
}

fn client(mut config: kube::Config, api_timeout: Duration) -> Result<kube::Client, String> {
    // No read timeout: the pod watch is a long poll (the watcher has its own
    // idle timeout); each TokenReview is bounded by `api_timeout` instead.
    config.connect_timeout = Some(api_timeout);
    // kube builds its rustls config without naming a provider: it takes the
    // process default, which `app::spawn` (the only way here) has set.
    kube::Client::try_from(config).map_err(|e| e.to_string())
}

/// `(cluster id, file)` for each kubeconfig in `dir`. Hidden entries are
/// skipped: a mounted Secret also holds `..data` and timestamped directories.
fn remote_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, KubeSetupError> {
    let err = |e: std::io::Error| KubeSetupError::RemoteDir {
        dir: dir.to_path_buf(),
        reason: e.to_string(),
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // `metadata` follows symlinks, as Secret keys are symlinks into `..data`.
        if std::fs::metadata(&path).map_err(err)?.is_file() {
            files.push((name, path));
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_kubeconfigs_are_the_visible_files_of_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cluster-b"), "x").unwrap();
        std::fs::write(dir.path().join("cluster-a"), "x").unwrap();
        std::fs::write(dir.path().join(".hidden"), "x").unwrap();
        std::fs::create_dir(dir.path().join("..2024_01_01")).unwrap();
        std::fs::create_dir(dir.path().join("subdir")).unwrap();
        let ids: Vec<String> = remote_files(dir.path())
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, ["cluster-a", "cluster-b"]);
        assert!(matches!(
            remote_files(&dir.path().join("missing")),
            Err(KubeSetupError::RemoteDir { .. })
        ));
    }

    const PLUGIN_KUBECONFIG: &str = "apiVersion: v1
kind: Config
clusters:
- name: c
  cluster:
    server: https://127.0.0.1:1
contexts:
- name: c
  context: {cluster: c, user: plain}
current-context: c
users:
- name: plain
  user:
    token: t
- name: sneaky
  user:
";

    #[test]
    fn remote_kubeconfigs_with_credential_plugins_are_refused_naming_the_user() {
        let dir = tempfile::tempdir().unwrap();
        for (user, kind) in [
            (
                "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: /bin/true\n",
                CredentialPlugin::Exec,
            ),
            (
                "    auth-provider:\n      name: gcp\n      config: {cmd-path: /bin/true}\n",
                CredentialPlugin::AuthProvider,
            ),
        ] {
            let file = dir.path().join("remote");
            std::fs::write(&file, format!("{PLUGIN_KUBECONFIG}{user}")).unwrap();
            let e = remote_kubeconfig(&file, false).unwrap_err();
            assert!(
                matches!(&e, KubeSetupError::RemoteCredentialPlugin { user, kind: k, .. } if user == "sneaky" && *k == kind),
                "{e}"
            );
            assert!(e.to_string().starts_with(&format!(
                "--remote-kubeconfigs {}: user \"sneaky\" has a credential plugin ({kind})",
                file.display()
            )));
            assert!(
                remote_kubeconfig(&file, true).is_ok(),
                "allowed by the flag"
            );
        }
        let file = dir.path().join("plain");
        std::fs::write(
            &file,
            PLUGIN_KUBECONFIG.trim_end_matches("- name: sneaky\n  user:\n"),
        )
        .unwrap();
        assert!(remote_kubeconfig(&file, false).is_ok());
    }
}

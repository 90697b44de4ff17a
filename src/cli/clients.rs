//! `kling-relay clients ...`: the internal clients that call the API, managed from the database.

use crate::config::Settings;
use crate::storage::Store;
use anyhow::Context;
use clap::Subcommand;
use std::time::Duration;

#[derive(Subcommand)]
pub enum ClientsCommand {
    /// Create a client; prints its API key (shown only now) and notification signing secret.
    Create {
        /// The client's name (letters, digits, `-`, `_`, `.`).
        name: String,
        /// Default notify URL for the client's tasks.
        #[arg(long)]
        notify_url: Option<String>,
        /// Print {"name", "api_key", "signing_secret"} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List clients.
    List {
        /// Print a JSON array of clients.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a client's API key for good.
    Revoke {
        /// The client's name.
        name: String,
        /// Print {"name", "revoked"} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make a new signing secret; the old one keeps signing beside it for the grace period.
    RotateSecret {
        /// The client's name.
        name: String,
        /// How long the old secret stays valid (default: notifications.secret_rotation_grace).
        #[arg(long, value_parser = humantime::parse_duration)]
        grace: Option<Duration>,
        /// Print {"name", "signing_secret", "previous_valid_for_seconds"} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set the client's share of the upstream units: its weight when clients compete, and a cap.
    Set {
        /// The client's name.
        name: String,
        /// Relative share when several clients have work waiting (1 to 1000; default 1).
        #[arg(long)]
        weight: Option<i64>,
        /// Most units the client's tasks may hold upstream at once.
        #[arg(long, conflicts_with = "no_max_units")]
        max_units: Option<i64>,
        /// Remove the cap.
        #[arg(long)]
        no_max_units: bool,
        /// Budget: units the client's tasks may spend per UTC day (spent + reserved); a submit
        /// over it is refused with 429.
        #[arg(long, conflicts_with = "no_units_per_day")]
        units_per_day: Option<i64>,
        /// Remove the daily budget.
        #[arg(long)]
        no_units_per_day: bool,
        /// Budget: units per UTC month.
        #[arg(long, conflicts_with = "no_units_per_month")]
        units_per_month: Option<i64>,
        /// Remove the monthly budget.
        #[arg(long)]
        no_units_per_month: bool,
        /// Print the client's settings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set (or with --clear, remove) the client's default notify URL.
    SetNotifyUrl {
        /// The client's name.
        name: String,
        /// The default notify URL for the client's tasks (http or https).
        url: Option<String>,
        /// Remove the default notify URL.
        #[arg(long, conflicts_with = "url")]
        clear: bool,
        /// Print {"name", "notify_url"} as JSON.
        #[arg(long)]
        json: bool,
    },
}

impl ClientsCommand {
    /// Whether the command only reads (so a missing database is an error, not a new one).
    pub fn only_reads(&self) -> bool {
        matches!(self, ClientsCommand::List { .. })
    }
}

/// A duration as people say it: `1 day`, `36 hours`, `90 seconds`.
fn spoken(d: Duration) -> String {
    let secs = d.as_secs();
    let (n, unit) = if secs > 0 && secs.is_multiple_of(86_400) {
        (secs / 86_400, "day")
    } else if secs > 0 && secs.is_multiple_of(3_600) {
        (secs / 3_600, "hour")
    } else if secs > 0 && secs.is_multiple_of(60) {
        (secs / 60, "minute")
    } else {
        (secs, "second")
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

pub async fn run(
    store: &Store,
    settings: &Settings,
    command: ClientsCommand,
) -> anyhow::Result<()> {
    use crate::resource::rfc3339;
    use crate::service::clients as admin;
    match command {
        ClientsCommand::Create {
            name,
            notify_url,
            json,
        } => {
            let c = admin::create_client(store, &name, notify_url.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string(&c)?);
            } else {
                println!("client:         {}", c.name);
                println!("api key:        {}", c.api_key);
                println!("signing secret: {}", c.signing_secret);
                println!("(the API key is shown only now; only its hash is stored)");
            }
        }
        ClientsCommand::List { json } => {
            let clients = store.list_clients().await?;
            if json {
                let list: Vec<serde_json::Value> = clients
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "name": c.name,
                            "api_key_prefix": c.api_key_prefix,
                            "notify_url": c.notify_url,
                            "created_at": rfc3339(c.created_at_ms),
                            "revoked_at": c.revoked_at_ms.map(rfc3339),
                            "weight": c.weight,
                            "max_units": c.max_units,
                            "units_per_day": c.units_per_day,
                            "units_per_month": c.units_per_month,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string(&list)?);
            } else {
                println!(
                    "{:<24} {:<12} {:<8} {:>6} {:>9} {:>9} {:>11} notify url",
                    "name", "key", "state", "weight", "max units", "units/day", "units/month"
                );
                let dash = |v: Option<i64>| v.map_or("-".to_string(), |m| m.to_string());
                for c in clients {
                    println!(
                        "{:<24} {:<12} {:<8} {:>6} {:>9} {:>9} {:>11} {}",
                        c.name,
                        format!("{}…", c.api_key_prefix),
                        if c.is_revoked() { "revoked" } else { "active" },
                        c.weight,
                        dash(c.max_units),
                        dash(c.units_per_day),
                        dash(c.units_per_month),
                        c.notify_url.unwrap_or_default()
                    );
                }
            }
        }
        ClientsCommand::Revoke { name, json } => {
            store.revoke_client(&name, crate::service::now_ms()).await?;
            if json {
                println!("{}", serde_json::json!({"name": name, "revoked": true}));
            } else {
                println!("client `{name}` revoked");
            }
        }
        ClientsCommand::RotateSecret { name, grace, json } => {
            let grace = grace.unwrap_or(settings.notifications.secret_rotation_grace);
            let secret = admin::rotate_secret(store, &name, grace).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "name": name,
                        "signing_secret": secret,
                        "previous_valid_for_seconds": grace.as_secs(),
                    })
                );
            } else {
                println!("signing secret: {secret}");
                println!("(the previous secret keeps signing for {})", spoken(grace));
            }
        }
        ClientsCommand::Set {
            name,
            weight,
            max_units,
            no_max_units,
            units_per_day,
            no_units_per_day,
            units_per_month,
            no_units_per_month,
            json,
        } => {
            let setting = |value: Option<i64>, remove: bool| {
                if remove {
                    Some(None)
                } else {
                    value.map(Some)
                }
            };
            let cap = setting(max_units, no_max_units);
            let per_day = setting(units_per_day, no_units_per_day);
            let per_month = setting(units_per_month, no_units_per_month);
            if weight.is_none() && cap.is_none() && per_day.is_none() && per_month.is_none() {
                anyhow::bail!(
                    "give --weight, --max-units, --units-per-day or --units-per-month (or a --no-… to remove one)"
                );
            }
            if weight.is_some() || cap.is_some() {
                admin::set_share(store, &name, weight, cap).await?;
            }
            if per_day.is_some() || per_month.is_some() {
                admin::set_budgets(store, &name, per_day, per_month).await?;
            }
            let c = store
                .get_client(&name)
                .await?
                .with_context(|| format!("no client named `{name}`"))?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "name": name,
                        "weight": c.weight,
                        "max_units": c.max_units,
                        "units_per_day": c.units_per_day,
                        "units_per_month": c.units_per_month,
                    })
                );
                return Ok(());
            }
            let or_none = |v: Option<i64>| v.map_or("none".to_string(), |m| m.to_string());
            println!(
                "client `{name}`: weight {}, max units {}, units per day {}, units per month {}",
                c.weight,
                or_none(c.max_units),
                or_none(c.units_per_day),
                or_none(c.units_per_month),
            );
        }
        ClientsCommand::SetNotifyUrl {
            name,
            url,
            clear,
            json,
        } => {
            if url.is_none() && !clear {
                anyhow::bail!("give a URL, or --clear");
            }
            admin::set_notify_url(store, &name, url.as_deref()).await?;
            if json {
                println!("{}", serde_json::json!({"name": name, "notify_url": url}));
                return Ok(());
            }
            println!(
                "client `{name}` notify url: {}",
                url.as_deref().unwrap_or("(none)")
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_spoken() {
        assert_eq!(spoken(Duration::from_secs(86_400)), "1 day");
        assert_eq!(spoken(Duration::from_secs(2 * 86_400)), "2 days");
        assert_eq!(spoken(Duration::from_secs(36 * 3_600)), "36 hours");
        assert_eq!(spoken(Duration::from_secs(90)), "90 seconds");
        assert_eq!(spoken(Duration::from_secs(120)), "2 minutes");
    }
}

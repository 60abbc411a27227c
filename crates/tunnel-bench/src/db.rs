//! The database each bench server gets: a fresh SQLite file, or a fresh PostgreSQL database
//! created on the server `--database postgres://…` points at and dropped afterwards.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

#[derive(Debug, Clone)]
pub(crate) enum BenchDb {
    Sqlite(PathBuf),
    Postgres {
        /// Where `CREATE DATABASE` / `DROP DATABASE` are run (the URL given).
        admin: String,
        /// The URL of the new database.
        url: String,
        name: String,
    },
}

pub(crate) fn is_postgres(spec: &str) -> bool {
    spec.starts_with("postgres://") || spec.starts_with("postgresql://")
}

impl BenchDb {
    /// A fresh SQLite file at `path` (which must not exist yet).
    pub(crate) fn sqlite(path: &Path) -> Result<BenchDb> {
        if path.exists() {
            bail!(
                "{} already exists; the bench needs a fresh database (remove it or pick another path)",
                path.display()
            );
        }
        Ok(BenchDb::Sqlite(path.to_path_buf()))
    }

    /// Creates a new, empty database on the PostgreSQL server of `admin_url`.
    pub(crate) async fn postgres(admin_url: &str, tag: &str) -> Result<BenchDb> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!("tunnel_bench_{}_{nanos}_{tag}", std::process::id());
        let url = with_database(admin_url, &name)?;
        admin(admin_url, &format!("CREATE DATABASE {name}")).await?;
        Ok(BenchDb::Postgres {
            admin: admin_url.to_owned(),
            url,
            name,
        })
    }

    /// What `tunnel serve --database` gets.
    pub(crate) fn server_arg(&self) -> String {
        match self {
            BenchDb::Sqlite(p) => p.display().to_string(),
            BenchDb::Postgres { url, .. } => url.clone(),
        }
    }

    /// The same database as `tunnel-store` opens it, to check what is in it.
    pub(crate) fn store_database(&self) -> tunnel_store::Database {
        match self {
            BenchDb::Sqlite(p) => tunnel_store::Database::Sqlite {
                path: p.clone(),
                durability: tunnel_store::Durability::Normal,
            },
            BenchDb::Postgres { url, .. } => tunnel_store::Database::Postgres { url: url.clone() },
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            BenchDb::Sqlite(p) => p.display().to_string(),
            BenchDb::Postgres { name, .. } => format!("PostgreSQL database {name}"),
        }
    }

    /// Drops a PostgreSQL database made for the run (a SQLite file goes with its directory).
    pub(crate) async fn remove(&self) -> Result<()> {
        if let BenchDb::Postgres { admin: a, name, .. } = self {
            admin(a, &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await?;
        }
        Ok(())
    }
}

async fn admin(url: &str, sql: &str) -> Result<()> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {url}"))?;
    let driver = tokio::spawn(conn);
    client
        .batch_execute(sql)
        .await
        .with_context(|| format!("PostgreSQL: {sql}"))?;
    drop(client);
    let _ = driver.await;
    Ok(())
}

/// `url` with its database name replaced by `name` (query parameters kept).
fn with_database(url: &str, name: &str) -> Result<String> {
    let scheme_end = url.find("://").context("not a URL")? + 3;
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    Ok(format!("{}/{name}{query}", &base[..host_end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_name_is_replaced() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "b").unwrap(),
            "postgres://postgres@127.0.0.1:5432/b"
        );
        assert_eq!(
            with_database("postgres://127.0.0.1", "b").unwrap(),
            "postgres://127.0.0.1/b"
        );
        assert_eq!(
            with_database("postgresql://u@h/db?sslmode=disable", "b").unwrap(),
            "postgresql://u@h/b?sslmode=disable"
        );
    }
}

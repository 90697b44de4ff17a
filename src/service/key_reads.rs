//! API keys looked up in groups (`group_commit::GroupRead`): a reader takes whatever lookups are
//! queued and reads their clients in one query. Each request still reads the clients table as
//! it is at that moment (a key revoked a moment ago is refused, on every replica, as before); a
//! burst of requests costs the database a statement per group instead of one each, which at a
//! few thousand submits a second was most of their statements (BENCHMARKS §15).

use super::group_commit::GroupRead;
use crate::domain::client::Client;
use crate::storage::Store;

/// A client with its key's hash as stored, found by that hash.
pub type KeyReads = GroupRead<(Client, String)>;

pub fn start(store: Store, readers: usize, max_batch: usize) -> KeyReads {
    GroupRead::start(
        readers,
        max_batch,
        "key reader",
        move |hashes: Vec<String>| {
            let store = store.clone();
            async move {
                let hashes: Vec<&str> = hashes.iter().map(String::as_str).collect();
                let found = store.clients_by_key_hashes(&hashes).await?;
                Ok(found
                    .into_iter()
                    .map(|(client, hash)| (hash.clone(), Ok((client, hash))))
                    .collect())
            }
        },
    )
}

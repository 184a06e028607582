//! The UDP session table: sessions keyed by client address, ordered by last activity.
//!
//! Plain data, no sockets, so it is tested without I/O. Invariants: every session is both in the
//! slab and in the client map; the intrusive list runs from the most to the least recently
//! active session, so the victim of a `max_sessions` eviction is found in O(1) and a datagram
//! moves its session to the front in O(1). No allocation per datagram: the map and slab grow
//! only when a new client arrives.

use std::collections::HashMap;
use std::net::SocketAddr;

use slab::Slab;

const NIL: usize = usize::MAX;

struct Entry<S> {
    client: SocketAddr,
    value: S,
    /// Towards the more recently active end.
    newer: usize,
    /// Towards the less recently active end.
    older: usize,
}

pub struct SessionTable<S> {
    slab: Slab<Entry<S>>,
    by_client: HashMap<SocketAddr, usize>,
    newest: usize,
    oldest: usize,
}

impl<S> Default for SessionTable<S> {
    fn default() -> Self {
        SessionTable {
            slab: Slab::new(),
            by_client: HashMap::new(),
            newest: NIL,
            oldest: NIL,
        }
    }
}

impl<S> SessionTable<S> {
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    pub fn find(&self, client: &SocketAddr) -> Option<usize> {
        self.by_client.get(client).copied()
    }

    /// The key the next `insert` will use (to register a socket under it first).
    pub fn next_key(&self) -> usize {
        self.slab.vacant_key()
    }

    /// Adds a session as the most recently active one. A client already present is replaced.
    pub fn insert(&mut self, client: SocketAddr, value: S) -> usize {
        if let Some(old) = self.find(&client) {
            self.remove(old);
        }
        let key = self.slab.insert(Entry {
            client,
            value,
            newer: NIL,
            older: NIL,
        });
        self.by_client.insert(client, key);
        self.link_newest(key);
        key
    }

    pub fn get(&self, key: usize) -> Option<&S> {
        self.slab.get(key).map(|e| &e.value)
    }

    pub fn get_mut(&mut self, key: usize) -> Option<&mut S> {
        self.slab.get_mut(key).map(|e| &mut e.value)
    }

    pub fn client(&self, key: usize) -> Option<SocketAddr> {
        self.slab.get(key).map(|e| e.client)
    }

    /// Marks the session as the most recently active.
    pub fn touch(&mut self, key: usize) {
        if self.newest == key || !self.slab.contains(key) {
            return;
        }
        self.unlink(key);
        self.link_newest(key);
    }

    /// The least recently active session.
    pub fn oldest(&self) -> Option<usize> {
        (self.oldest != NIL).then_some(self.oldest)
    }

    pub fn remove(&mut self, key: usize) -> Option<S> {
        if !self.slab.contains(key) {
            return None;
        }
        self.unlink(key);
        let entry = self.slab.remove(key);
        self.by_client.remove(&entry.client);
        Some(entry.value)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut S> + '_ {
        self.slab.iter_mut().map(|(_, e)| &mut e.value)
    }

    pub fn keys(&self) -> impl Iterator<Item = usize> + '_ {
        self.slab.iter().map(|(k, _)| k)
    }

    fn link_newest(&mut self, key: usize) {
        let old_newest = self.newest;
        if let Some(e) = self.slab.get_mut(key) {
            e.newer = NIL;
            e.older = old_newest;
        }
        match self.slab.get_mut(old_newest) {
            Some(e) => e.newer = key,
            None => self.oldest = key,
        }
        self.newest = key;
    }

    fn unlink(&mut self, key: usize) {
        let Some(e) = self.slab.get(key) else {
            return;
        };
        let (newer, older) = (e.newer, e.older);
        match self.slab.get_mut(newer) {
            Some(n) => n.older = older,
            None => self.newest = older,
        }
        match self.slab.get_mut(older) {
            Some(o) => o.newer = newer,
            None => self.oldest = newer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Walks oldest → newest through the links, checking both directions agree.
    fn order(t: &SessionTable<u16>) -> Vec<u16> {
        let mut out = Vec::new();
        let mut k = t.oldest;
        let mut prev = NIL;
        while k != NIL {
            let e = &t.slab[k];
            assert_eq!(e.older, prev);
            out.push(e.value);
            prev = k;
            k = e.newer;
        }
        assert_eq!(prev, t.newest);
        out
    }

    #[test]
    fn lru_order_follows_activity() {
        let mut t = SessionTable::default();
        let keys: Vec<usize> = (1..=4).map(|p| t.insert(addr(p), p)).collect();
        assert_eq!(order(&t), vec![1, 2, 3, 4]);
        t.touch(keys[0]);
        assert_eq!(order(&t), vec![2, 3, 4, 1]);
        t.touch(keys[2]);
        assert_eq!(order(&t), vec![2, 4, 1, 3]);
        assert_eq!(t.oldest().and_then(|k| t.get(k)).copied(), Some(2));
        t.remove(keys[1]);
        assert_eq!(order(&t), vec![4, 1, 3]);
        t.touch(keys[2]);
        assert_eq!(order(&t), vec![4, 1, 3]);
        assert_eq!(t.find(&addr(2)), None);
        assert_eq!(t.find(&addr(4)), Some(keys[3]));
    }

    #[test]
    fn eviction_keeps_map_and_list_in_step() {
        let mut t = SessionTable::default();
        for p in 0..100u16 {
            if t.len() == 10 {
                let victim = t.oldest().expect("a session to evict");
                assert_eq!(t.remove(victim), Some(p - 10));
            }
            t.insert(addr(1000 + p), p);
        }
        assert_eq!(t.len(), 10);
        assert_eq!(order(&t), (90..100).collect::<Vec<_>>());
        for k in t.keys().collect::<Vec<_>>() {
            t.remove(k);
        }
        assert!(t.is_empty());
        assert_eq!(t.oldest(), None);
        assert!(t.by_client.is_empty());
    }

    #[test]
    fn reinsert_replaces() {
        let mut t = SessionTable::default();
        t.insert(addr(1), 1);
        let k = t.insert(addr(1), 2);
        assert_eq!(t.len(), 1);
        assert_eq!(t.get(k), Some(&2));
        assert_eq!(order(&t), vec![2]);
        assert_eq!(t.next_key(), t.slab.vacant_key());
    }
}

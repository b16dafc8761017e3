//! Reading net-conf.json's objects as Go's `encoding/json` does (exact key first, then
//! case-insensitively), collecting every problem instead of stopping at the first.

use super::ConfigProblem;
use crate::subnet::Family;
use ipnet::IpNet;
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::net::IpAddr;

/// Case-insensitive view of a JSON object that remembers which keys were used.
pub(super) struct Obj<'a> {
    pub(super) map: &'a Map<String, Value>,
    pub(super) prefix: &'static str,
    used: BTreeSet<&'a str>,
}

impl<'a> Obj<'a> {
    pub(super) fn new(map: &'a Map<String, Value>, prefix: &'static str) -> Self {
        Obj {
            map,
            prefix,
            used: BTreeSet::new(),
        }
    }

    pub(super) fn get(&mut self, key: &str) -> Option<&'a Value> {
        let found = self
            .map
            .get_key_value(key)
            .or_else(|| self.map.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)));
        let (k, v) = found?;
        self.used.insert(k.as_str());
        if v.is_null() {
            None // Go leaves a field at its zero value for `null`
        } else {
            Some(v)
        }
    }

    pub(super) fn unknown(&self) -> Vec<String> {
        self.map
            .keys()
            .filter(|k| !self.used.contains(k.as_str()))
            .map(|k| format!("{}{}", self.prefix, k))
            .collect()
    }
}

pub(super) struct Ctx {
    pub(super) problems: Vec<ConfigProblem>,
}

impl Ctx {
    pub(super) fn problem(
        &mut self,
        key: &str,
        value: Option<&Value>,
        rule: impl Into<String>,
        example: &str,
    ) {
        self.problems.push(ConfigProblem {
            key: key.to_string(),
            value: value.map_or_else(|| "<missing>".to_string(), |v| v.to_string()),
            rule: rule.into(),
            example: example.to_string(),
        });
    }

    pub(super) fn bool(&mut self, o: &mut Obj, key: &str, default: bool) -> bool {
        match o.get(key) {
            None => default,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                let full = format!("{}{}", o.prefix, key);
                self.problem(
                    &full,
                    Some(v),
                    "must be true or false",
                    &format!("\"{key}\": {default}"),
                );
                default
            }
        }
    }

    /// An integer in `[lo, hi]`; `None` when absent or bad (a problem is recorded when bad).
    pub(super) fn int(
        &mut self,
        o: &mut Obj,
        key: &str,
        lo: u64,
        hi: u64,
        example: &str,
    ) -> Option<u64> {
        let v = o.get(key)?;
        match v.as_u64() {
            Some(n) if n >= lo && n <= hi => Some(n),
            _ => {
                let full = format!("{}{}", o.prefix, key);
                self.problem(
                    &full,
                    Some(v),
                    format!("must be a whole number from {lo} to {hi}"),
                    example,
                );
                None
            }
        }
    }

    pub(super) fn string<'v>(
        &mut self,
        o: &mut Obj<'v>,
        key: &str,
        example: &str,
    ) -> Option<&'v str> {
        let v = o.get(key)?;
        match v.as_str() {
            Some(s) => Some(s),
            None => {
                let full = format!("{}{}", o.prefix, key);
                self.problem(&full, Some(v), "must be a string", example);
                None
            }
        }
    }

    pub(super) fn net(
        &mut self,
        o: &mut Obj,
        key: &str,
        family: Family,
        example: &str,
    ) -> Option<IpNet> {
        let v = o.get(key)?;
        let parsed = v.as_str().and_then(|s| s.trim().parse::<IpNet>().ok());
        match parsed {
            Some(n) if Family::of(n.addr()) == family => Some(n),
            Some(_) => {
                let fam = if family == Family::V4 {
                    "an IPv4"
                } else {
                    "an IPv6"
                };
                self.problem(
                    key,
                    Some(v),
                    format!("must be {fam} network in CIDR form"),
                    example,
                );
                None
            }
            None => {
                self.problem(
                    key,
                    Some(v),
                    "must be a network in CIDR form (address/prefix length)",
                    example,
                );
                None
            }
        }
    }

    pub(super) fn addr(
        &mut self,
        o: &mut Obj,
        key: &str,
        family: Family,
        example: &str,
    ) -> Option<IpAddr> {
        let v = o.get(key)?;
        let parsed = v.as_str().and_then(|s| s.trim().parse::<IpAddr>().ok());
        match parsed {
            Some(a) if Family::of(a) == family => Some(a),
            _ => {
                let fam = if family == Family::V4 { "IPv4" } else { "IPv6" };
                self.problem(key, Some(v), format!("must be an {fam} address"), example);
                None
            }
        }
    }
}

// The raw values are looked up again for messages; `Obj::get` marks them used, which they are.
pub(super) fn raw_len(o: &mut Obj, key: &str) -> Option<Value> {
    o.get(key).cloned()
}
pub(super) fn o_raw(o: &Obj, key: &str) -> Option<Value> {
    o.map
        .get(key)
        .or_else(|| {
            o.map
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v)
        })
        .cloned()
}

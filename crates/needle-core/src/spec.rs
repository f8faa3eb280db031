//! The one spec grammar of needle and the one name registry behind it.
//!
//! Selectors, indexes and prefill patterns are all named by a spec `name[:key=value,...]`:
//! names are case-insensitive, keys are not, a key given twice is an error, and a piece
//! without `=` continues the previous value (so that FAISS-style factory strings such as
//! `index=IVF256,PQ16` fit inside a spec). [`SpecOptions`] splits a spec and reads its options
//! by type; every key a builder neither reads nor allows is an error naming it and listing the
//! valid ones ([`Registry::parse`] checks this after every builder, built in or plugged in).
//!
//! A [`Registry`] maps names to builders. Crates register built-ins through the same public
//! `register_*` function a plugin calls (needle-select's `register_selector` and
//! `register_index`, needle-prefill's `register_pattern`); the built-ins are registered on
//! first use of the registry.
//!
//! ```
//! use needle_core::spec::SpecOptions;
//! let o = SpecOptions::split("Oracle: k=50, sinks=4")?;
//! assert_eq!((o.name(), o.usize("k", 100)?, o.usize("window", 512)?), ("oracle", 50, 512));
//! assert!(o.only(&["k"]).unwrap_err().to_string().contains("sinks"));
//! assert!(SpecOptions::split("oracle:k=1,k=2").is_err());
//! # Ok::<(), needle_core::Error>(())
//! ```

use std::cell::RefCell;
use std::sync::{Arc, Mutex, Once, RwLock};

use crate::kit::{DEFAULT_SINKS, DEFAULT_WINDOW};
use crate::{Budget, Error, Result, SelectorFactory, StaticPart};

/// Default `k` of a selector spec.
pub const DEFAULT_K: usize = 100;
/// Default number of prefill positions whose queries train a selector.
pub const DEFAULT_TRAIN_POSITIONS: usize = 4096;

/// A parsed selector spec: the factory and the settings a model runs it with. What a
/// selector builder returns, and what a model takes (it needs no parser to take one).
pub struct SelectorSpec {
    /// Makes one selector per layer and KV head.
    pub factory: Box<dyn SelectorFactory>,
    /// Dynamic-part budget of every selector (`k`, or `mass` with `k` as cap).
    pub budget: Budget,
    /// The first `dense_layers` layers attend to everything.
    pub dense_layers: usize,
    /// At most this many prefill positions contribute training queries.
    pub train_positions: usize,
}

impl std::fmt::Debug for SelectorSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelectorSpec")
            .field("factory", &self.factory.describe())
            .field("budget", &self.budget)
            .field("dense_layers", &self.dense_layers)
            .field("train_positions", &self.train_positions)
            .finish()
    }
}

/// The options of one spec (`name:key=value,...`), read by name and type: what a builder gets,
/// whether built in or registered by another crate.
///
/// It remembers which keys were asked for, so that [`finish`](Self::finish) can reject a key
/// nobody read even when a builder forgot [`only`](Self::only).
pub struct SpecOptions {
    name: String,
    spec: String,
    opts: Vec<(String, String)>,
    // Keys asked for (read or allowed), in order: the valid ones, for errors.
    asked: Mutex<Vec<String>>,
}

impl std::fmt::Debug for SpecOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpecOptions").field("name", &self.name).field("opts", &self.opts).finish()
    }
}

impl SpecOptions {
    /// Keys every selecting spec accepts: `k`, `mass`, `sinks`, `window`, `dense_layers`,
    /// `train_positions`.
    pub const COMMON: &'static [&'static str] = &["k", "mass", "sinks", "window", "dense_layers", "train_positions"];

    /// Splits `name[:k=v,...]`; names are case-insensitive (kept lower case), keys are not.
    /// A piece without `=` continues the previous value; a key given twice is an error.
    pub fn split(spec: &str) -> Result<Self> {
        let (name, rest) = spec.split_once(':').unwrap_or((spec, ""));
        let name = name.trim().to_ascii_lowercase();
        if name.is_empty() {
            return Err(Error::invalid("spec", format!("`{spec}` has an empty name; specs are name[:key=value,...]")));
        }
        let mut opts: Vec<(String, String)> = Vec::new();
        for kv in rest.split(',').map(str::trim).filter(|kv| !kv.is_empty()) {
            let Some((k, v)) = kv.split_once('=') else {
                // Factory strings such as `index=IVF256,PQ16` hold commas.
                match opts.last_mut() {
                    Some((_, prev)) => {
                        prev.push(',');
                        prev.push_str(kv);
                        continue;
                    }
                    None => return Err(Error::invalid(format!("{name} option `{kv}`"), "options are key=value")),
                }
            };
            let k = k.trim().to_string();
            if k.is_empty() {
                return Err(Error::invalid(format!("{name} option `{kv}`"), "empty key; options are key=value"));
            }
            if opts.iter().any(|(o, _)| *o == k) {
                return Err(Error::invalid(format!("{name} option `{k}`"), "given twice"));
            }
            opts.push((k, v.trim().to_string()));
        }
        Ok(Self { name, spec: spec.trim().to_string(), opts, asked: Mutex::new(Vec::new()) })
    }

    /// The name, lower case.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The spec as given (trimmed).
    pub fn text(&self) -> &str {
        &self.spec
    }

    /// The keys given, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.opts.iter().map(|(k, _)| k.as_str())
    }

    fn ask(&self, key: &str) {
        let mut asked = self.asked.lock().unwrap_or_else(|e| e.into_inner());
        if !asked.iter().any(|k| k == key) {
            asked.push(key.to_string());
        }
    }

    fn unknown(&self, key: &str, valid: &[String]) -> Error {
        Error::invalid(
            format!("{} option `{key}`", self.name),
            format!("unknown; valid options: {}", if valid.is_empty() { "none".into() } else { valid.join(", ") }),
        )
    }

    /// Errors on any key outside `allowed`, naming it and listing the valid ones.
    pub fn only(&self, allowed: &[&str]) -> Result<()> {
        for k in allowed {
            self.ask(k);
        }
        match self.opts.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            None => Ok(()),
            Some((k, _)) => Err(self.unknown(k, &allowed.iter().map(|s| s.to_string()).collect::<Vec<_>>())),
        }
    }

    /// Errors on any key given but never asked for (by [`only`](Self::only) or a getter),
    /// listing the ones that were. [`Registry::parse`] calls it after every builder.
    pub fn finish(&self) -> Result<()> {
        let asked = self.asked.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match self.opts.iter().find(|(k, _)| !asked.contains(k)) {
            None => Ok(()),
            Some((k, _)) => Err(self.unknown(k, &asked)),
        }
    }

    /// The raw value of `key`, if given.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.ask(key);
        self.opts.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// `key` parsed as a `T`, `default` when absent; `what` says what a valid value is.
    pub fn get<T: std::str::FromStr>(&self, key: &str, default: T, what: &str) -> Result<T> {
        match self.str(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| Error::invalid(format!("{} option `{key}`", self.name), format!("`{v}` is not {what}"))),
        }
    }

    /// `key` as a whole number, `default` when absent.
    pub fn usize(&self, key: &str, default: usize) -> Result<usize> {
        self.get(key, default, "a whole number")
    }

    /// `key` as a finite number, if given.
    pub fn f32(&self, key: &str) -> Result<Option<f32>> {
        match self.str(key) {
            None => Ok(None),
            Some(v) => match v.parse::<f32>() {
                Ok(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(Error::invalid(format!("{} option `{key}`", self.name), format!("`{v}` is not a number"))),
            },
        }
    }

    /// `sinks` and `window` (defaults 128 and 512, as every built-in selector).
    pub fn static_part(&self) -> Result<StaticPart> {
        Ok(StaticPart { sinks: self.usize("sinks", DEFAULT_SINKS)?, window: self.usize("window", DEFAULT_WINDOW)? })
    }

    /// `k` (default [`DEFAULT_K`]), or `mass` in `(0, 1]` with `k` as the cap.
    pub fn budget(&self) -> Result<Budget> {
        let k = self.usize("k", DEFAULT_K)?;
        if k == 0 {
            return Err(Error::invalid(format!("{} option `k`", self.name), "must be at least 1"));
        }
        match self.f32("mass")? {
            None => Ok(Budget::TopK(k)),
            Some(t) if t > 0.0 && t <= 1.0 => Ok(Budget::Mass { target: t, max: k }),
            Some(t) => Err(Error::invalid(format!("{} option `mass`", self.name), format!("{t} is not in (0, 1]"))),
        }
    }

    /// The parsed selector spec: `factory` with `budget` and the common model settings
    /// (`dense_layers`, `train_positions`).
    pub fn spec(&self, factory: Box<dyn SelectorFactory>, budget: Budget) -> Result<SelectorSpec> {
        self.spec_training(factory, budget, DEFAULT_TRAIN_POSITIONS)
    }

    /// [`spec`](Self::spec) with another default for `train_positions` (0 for selectors that
    /// learn nothing from prefill queries, so none are kept).
    pub fn spec_training(
        &self,
        factory: Box<dyn SelectorFactory>,
        budget: Budget,
        train_positions: usize,
    ) -> Result<SelectorSpec> {
        Ok(SelectorSpec {
            factory,
            budget,
            dense_layers: self.usize("dense_layers", 0)?,
            train_positions: self.usize("train_positions", train_positions)?,
        })
    }
}

struct Entry<T: ?Sized> {
    name: String,
    about: String,
    item: Arc<T>,
}

/// Names to builders (`T` is usually a `dyn Fn`), thread-safe, for one kind of plugin.
///
/// `builtins` registers the owning crate's built-ins through its public `register_*`
/// function; it runs once, on the first use of the registry (registering included), so that a
/// plugin can neither shadow a built-in nor be shadowed by one. `reserved` names are listed
/// and cannot be registered, but resolve to nothing: the owner handles them before the lookup
/// (`auto` for selectors, `dense` for prefill patterns).
pub struct Registry<T: ?Sized> {
    what: &'static str,
    reserved: &'static [(&'static str, &'static str)],
    builtins: fn(),
    init: Once,
    entries: RwLock<Vec<Entry<T>>>,
}

thread_local! {
    // Registries whose `builtins` run on this thread now: their `register` calls must not wait
    // for the initialisation they are part of.
    static INITIALISING: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

impl<T: ?Sized> Registry<T> {
    /// An empty registry of `what` (for errors: "selector", "index", ...).
    pub const fn new(what: &'static str, reserved: &'static [(&'static str, &'static str)], builtins: fn()) -> Self {
        Self { what, reserved, builtins, init: Once::new(), entries: RwLock::new(Vec::new()) }
    }

    fn ensure_builtins(&self) {
        let me = self as *const Self as *const () as usize;
        if INITIALISING.with(|s| s.borrow().contains(&me)) {
            return;
        }
        self.init.call_once(|| {
            INITIALISING.with(|s| s.borrow_mut().push(me));
            (self.builtins)();
            INITIALISING.with(|s| s.borrow_mut().retain(|&r| r != me));
        });
    }

    /// Registers `item` under `name` (stored lower case) with a one-line description.
    ///
    /// Errors when the name is empty, holds whitespace, `:`, `,` or `=`, or is taken (built in,
    /// reserved or registered before).
    pub fn register(&self, name: &str, about: &str, item: Arc<T>) -> Result<()> {
        self.ensure_builtins();
        let name = name.trim().to_ascii_lowercase();
        if name.is_empty() || name.contains([':', ',', '=']) || name.contains(char::is_whitespace) {
            return Err(Error::invalid(
                format!("{} name", self.what),
                format!("`{name}` must be non-empty without whitespace, `:`, `,` or `=`"),
            ));
        }
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if self.reserved.iter().any(|(n, _)| *n == name) || entries.iter().any(|e| e.name == name) {
            return Err(Error::invalid(format!("{} name", self.what), format!("`{name}` is already registered")));
        }
        entries.push(Entry { name, about: about.to_string(), item });
        Ok(())
    }

    /// The builder registered under `name` (case-insensitive), if any.
    pub fn find(&self, name: &str) -> Option<Arc<T>> {
        self.ensure_builtins();
        let name = name.trim().to_ascii_lowercase();
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries.iter().find(|e| e.name == name).map(|e| e.item.clone())
    }

    /// The builder registered under `name`, or an error naming it and listing the valid names.
    pub fn get(&self, name: &str) -> Result<Arc<T>> {
        self.find(name).ok_or_else(|| self.unknown(name))
    }

    /// The error for an unknown `name`: it lists every valid one.
    pub fn unknown(&self, name: &str) -> Error {
        Error::invalid(self.what, format!("unknown {} `{}`; valid: {}", self.what, name.trim(), self.names_joined()))
    }

    /// Every name with its description: reserved ones first, then in order of registration
    /// (built-ins, then plugins).
    pub fn names(&self) -> Vec<(String, String)> {
        self.ensure_builtins();
        let mut v: Vec<(String, String)> = self.reserved.iter().map(|(n, a)| (n.to_string(), a.to_string())).collect();
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        v.extend(entries.iter().map(|e| (e.name.clone(), e.about.clone())));
        v
    }

    /// The names, comma-separated, for help and errors.
    pub fn names_joined(&self) -> String {
        self.names().into_iter().map(|(n, _)| n).collect::<Vec<_>>().join(", ")
    }

    /// Splits `spec`, looks its name up, runs `build` on the builder and the options, and
    /// then rejects any key the builder neither read nor allowed ([`SpecOptions::finish`]).
    pub fn parse<R>(&self, spec: &str, build: impl FnOnce(&T, &SpecOptions) -> Result<R>) -> Result<R> {
        let o = SpecOptions::split(spec)?;
        let builder = self.get(o.name())?;
        let r = build(&*builder, &o)?;
        o.finish()?;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    type Build = dyn Fn(&SpecOptions) -> Result<usize> + Send + Sync;

    static REG: Registry<Build> = Registry::new("widget", &[("auto", "picks one")], builtins);

    fn register_widget(
        name: &str,
        about: &str,
        b: impl Fn(&SpecOptions) -> Result<usize> + Send + Sync + 'static,
    ) -> Result<()> {
        REG.register(name, about, Arc::new(b))
    }

    fn builtins() {
        register_widget("sum", "adds a and b", |o| Ok(o.usize("a", 1)? + o.usize("b", 2)?)).unwrap();
        register_widget("strict", "allows x only", |o| {
            o.only(&["x"])?;
            o.usize("x", 0)
        })
        .unwrap();
        register_widget("len", "length of `s`", |o| Ok(o.str("s").map_or(0, str::len))).unwrap();
    }

    fn parse(spec: &str) -> Result<usize> {
        REG.parse(spec, |b, o| b(o))
    }

    fn err(spec: &str) -> (String, String) {
        match parse(spec).unwrap_err() {
            Error::InvalidParameter { name, reason } => (name, reason),
            e => panic!("{spec}: {e}"),
        }
    }

    #[test]
    fn specs_split_and_read_back() {
        assert_eq!(parse("sum").unwrap(), 3);
        assert_eq!(parse(" SUM : b=10 , a=5 ").unwrap(), 15);
        assert_eq!(parse("len:s=IVF256,PQ16").unwrap(), "IVF256,PQ16".len());
        assert_eq!(parse("strict:x=7").unwrap(), 7);
        let o = SpecOptions::split("Retrieval:index=IVF64,PQ16,k=10,mass=0.9").unwrap();
        assert_eq!((o.name(), o.str("index"), o.usize("k", 0).unwrap()), ("retrieval", Some("IVF64,PQ16"), 10));
        assert_eq!(o.keys().collect::<Vec<_>>(), ["index", "k", "mass"]);
        assert_eq!(o.budget().unwrap(), Budget::Mass { target: 0.9, max: 10 });
        assert_eq!(o.static_part().unwrap(), StaticPart { sinks: DEFAULT_SINKS, window: DEFAULT_WINDOW });
        assert_eq!(o.f32("mass").unwrap(), Some(0.9));
        assert_eq!(o.get("k", 0u8, "a byte").unwrap(), 10);
        o.finish().unwrap();
    }

    #[test]
    fn every_error_names_the_key_and_the_valid_ones() {
        assert_eq!(err("sum:a=1,a=2"), ("sum option `a`".into(), "given twice".into()));
        let (name, reason) = err("sum:c=1");
        assert_eq!(name, "sum option `c`");
        assert!(reason.contains("a, b"), "{reason}");
        let (name, reason) = err("strict:y=1");
        assert_eq!((name.as_str(), reason.as_str()), ("strict option `y`", "unknown; valid options: x"));
        assert_eq!(err("sum:a=x").0, "sum option `a`");
        assert_eq!(err("sum:a").0, "sum option `a`");
        assert_eq!(err("sum:=3").0, "sum option `=3`");
        assert_eq!(err("").0, "spec");
        assert_eq!(err(":a=1").0, "spec");
        let (name, reason) = err("nope");
        assert_eq!(name, "widget");
        assert!(reason.contains("`nope`") && reason.contains("auto, sum, strict, len"), "{reason}");
        // Reserved names are listed but resolve to nothing: their owner handles them first.
        assert_eq!(err("auto").0, "widget");
        let o = SpecOptions::split("x:mass=2,k=0").unwrap();
        assert!(o.budget().is_err());
        let o = SpecOptions::split("x:mass=2").unwrap();
        assert!(o.budget().unwrap_err().to_string().contains("mass"));
        let o = SpecOptions::split("x:mass=inf").unwrap();
        assert!(o.f32("mass").is_err());
    }

    #[test]
    fn names_are_unique_and_built_ins_come_first() {
        register_widget("Plugged", "a plugin", |o| o.usize("n", 4)).unwrap();
        assert_eq!(parse("plugged:n=9").unwrap(), 9);
        let names: Vec<String> = REG.names().into_iter().map(|(n, _)| n).collect();
        assert_eq!(&names[..4], ["auto", "sum", "strict", "len"]);
        assert!(names.contains(&"plugged".to_string()));
        for bad in ["plugged", "SUM", "auto", "", "a:b", "a,b", "a=b", "a b"] {
            let e = register_widget(bad, "again", |_| Ok(0)).unwrap_err();
            assert!(matches!(&e, Error::InvalidParameter { name, .. } if name == "widget name"), "{bad}: {e}");
        }
        assert!(REG.find("PLUGGED").is_some());
        assert!(REG.find("auto").is_none());
    }

    #[test]
    fn first_use_from_many_threads_registers_the_built_ins_once() {
        static LATE: Registry<Build> = Registry::new("late", &[], late_builtins);
        fn late_builtins() {
            LATE.register("one", "1", Arc::new(|_: &SpecOptions| -> Result<usize> { Ok(1) })).unwrap();
        }
        let found: Vec<bool> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8).map(|_| s.spawn(|| LATE.find("one").is_some())).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(found.iter().all(|&f| f));
        assert_eq!(LATE.names().len(), 1);
    }
}

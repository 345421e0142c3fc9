//! Settings that are one of a few named values (`--norm fused`, `model = "lenet-bn"`): each
//! name is written once, where the enum is declared, and serves the command line, recipe and
//! `config.json` files and error messages alike. The library needs no command-line crate for it.

/// An enum whose values have names, as [`choice_enum!`](crate::choice_enum) declares them.
pub trait Choice: Copy + Eq + 'static {
    /// Every value, in declaration order.
    const ALL: &'static [Self];
    /// What the value is called on the command line and in files.
    fn name(self) -> &'static str;
    /// One line on what the value means (its doc comment).
    fn help(self) -> &'static str;

    /// The value called `name`, or an error that lists the names (and the closest one).
    fn from_name(name: &str) -> Result<Self, UnknownName> {
        Self::ALL
            .iter()
            .copied()
            .find(|v| v.name() == name)
            .ok_or_else(|| UnknownName::new(name, Self::ALL.iter().map(|v| v.name())))
    }
}

/// A name that is none of a [`Choice`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{given}' is not one of {}{}", .names.join(", "), did_you_mean(.closest))]
pub struct UnknownName {
    /// The name given.
    pub given: String,
    /// The names there are.
    pub names: Vec<&'static str>,
    /// The listed name nearest to `given`, if one is near.
    pub closest: Option<&'static str>,
}

fn did_you_mean(closest: &Option<&'static str>) -> String {
    closest.map_or(String::new(), |c| format!(" (did you mean {c}?)"))
}

impl UnknownName {
    /// `given` is none of `names`; finds the closest of them.
    pub fn new(given: &str, names: impl Iterator<Item = &'static str>) -> Self {
        let names: Vec<&'static str> = names.collect();
        Self {
            given: given.to_string(),
            closest: closest(given, &names),
            names,
        }
    }
}

/// The name among `names` that `given` most likely meant: one it begins, or one within two
/// edits (and a quarter of its length) of it.
pub fn closest(given: &str, names: &[&'static str]) -> Option<&'static str> {
    names
        .iter()
        .map(|&n| (strsim::levenshtein(n, given), n))
        .filter(|&(d, n)| {
            (!given.is_empty() && n.starts_with(given)) || (d <= 2 && d * 4 <= n.len())
        })
        .min()
        .map(|(_, n)| n)
}

/// Declares an enum of named values: each variant's name (`Variant = "name"`) and doc comment
/// make its [`Choice`]; `Display`, `FromStr` and serde use the name.
#[macro_export]
macro_rules! choice_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[doc = $doc:literal])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[doc = $doc])* $variant, )+
        }

        impl $crate::choice::Choice for $name {
            const ALL: &'static [Self] = &[$(Self::$variant),+];
            fn name(self) -> &'static str {
                match self { $(Self::$variant => $text,)+ }
            }
            fn help(self) -> &'static str {
                match self { $(Self::$variant => concat!($($doc, "\n"),*),)+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str($crate::choice::Choice::name(*self))
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::choice::UnknownName;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                <Self as $crate::choice::Choice>::from_name(s)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str($crate::choice::Choice::name(*self))
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::choice_enum! {
        /// For the tests.
        enum Fruit {
            /// A red one.
            Apple = "apple",
            /// Two words.
            GreenPear = "green-pear",
        }
    }

    #[test]
    fn names_parse_print_and_round_trip_through_json() {
        assert_eq!("green-pear".parse::<Fruit>(), Ok(Fruit::GreenPear));
        assert_eq!(Fruit::Apple.to_string(), "apple");
        assert_eq!(
            serde_json::to_string(&Fruit::GreenPear).unwrap(),
            "\"green-pear\""
        );
        let back: Fruit = serde_json::from_str("\"apple\"").unwrap();
        assert_eq!(back, Fruit::Apple);
        assert_eq!(Fruit::Apple.help().trim(), "A red one.");
    }

    #[test]
    fn an_unknown_name_lists_the_names_and_the_closest() {
        let e = "aple".parse::<Fruit>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "'aple' is not one of apple, green-pear (did you mean apple?)"
        );
        let e = "banana".parse::<Fruit>().unwrap_err();
        assert_eq!(e.closest, None);
        assert!(serde_json::from_str::<Fruit>("\"kiwi\"").is_err());
    }
}

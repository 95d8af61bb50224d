//! Which tables a source captures: include and exclude patterns.

/// Include/exclude patterns over `schema.table` (Postgres) or `db.table`
/// (MySQL); `*` matches any run of characters, matching is exact otherwise.
#[derive(Clone, Debug)]
pub struct TableFilter {
    include: Vec<String>,
    exclude: Vec<String>,
}

impl TableFilter {
    /// A filter from the `tables` and `exclude_tables` settings.
    pub fn new(include: &[String], exclude: &[String]) -> Self {
        Self {
            include: include.to_vec(),
            exclude: exclude.to_vec(),
        }
    }

    /// True when `namespace.table` is captured.
    pub fn matches(&self, namespace: &str, table: &str) -> bool {
        let name = format!("{namespace}.{table}");
        self.include.iter().any(|p| glob(p, &name)) && !self.exclude.iter().any(|p| glob(p, &name))
    }

    /// The include patterns.
    pub fn include(&self) -> &[String] {
        &self.include
    }
}

/// Checks that a pattern has the `namespace.table` shape.
pub fn validate_pattern(pattern: &str) -> Result<(), String> {
    match pattern.split_once('.') {
        Some((ns, table)) if !ns.is_empty() && !table.is_empty() && !table.contains('.') => Ok(()),
        _ => Err(format!(
            "`{pattern}` is not of the form schema.table (use * as a wildcard, e.g. public.*)"
        )),
    }
}

fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_and_exclude() {
        let f = TableFilter::new(
            &["public.*".into(), "sales.orders".into()],
            &["public.audit_*".into()],
        );
        assert!(f.matches("public", "orders"));
        assert!(f.matches("sales", "orders"));
        assert!(!f.matches("sales", "orders2"));
        assert!(!f.matches("public", "audit_log"));
        assert!(!f.matches("other", "orders"));
        assert!(glob("*", "a.b"));
        assert!(glob("a*c*e", "abcde"));
        assert!(!glob("a*c*e", "abcd"));
        assert!(validate_pattern("public.*").is_ok());
        assert!(validate_pattern("orders").is_err());
        assert!(validate_pattern("a.b.c").is_err());
    }
}

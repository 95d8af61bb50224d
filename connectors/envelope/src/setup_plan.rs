//! The plan of `tributary setup`: the statements that prepare a source's
//! server for the connector, each with its reason, and the steps SQL cannot
//! do (a restart, a password).
//!
//! Beside the dataflow, before it starts. Each source plans from what its
//! server lacks and runs the plan over its own client; this type and its
//! rendering are shared so that `setup` reads the same for every source.

/// One statement of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupStatement {
    /// The statement, ending in `;`.
    pub sql: String,
    /// Why it is needed, printed as a comment above it.
    pub why: String,
}

/// What `setup` prints or runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetupPlan {
    /// The statements, in the order they must run.
    pub statements: Vec<SetupStatement>,
    /// Steps outside SQL, printed after the statements.
    pub afterwards: Vec<String>,
}

impl SetupPlan {
    /// Adds a statement.
    pub fn push(&mut self, sql: String, why: impl Into<String>) {
        self.statements.push(SetupStatement {
            sql,
            why: why.into(),
        });
    }

    /// The plan as an SQL script: each statement under a comment saying
    /// why, then the other steps as comments.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if self.statements.is_empty() {
            out.push_str("-- nothing to do: the server is ready for the connector\n");
        }
        for step in &self.statements {
            out.push_str(&format!("-- {}\n{}\n", step.why, step.sql));
        }
        for note in &self.afterwards {
            out.push_str(&format!("-- then: {note}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_reasons_statements_and_steps() {
        let mut plan = SetupPlan::default();
        assert!(plan.render().starts_with("-- nothing to do"));
        plan.push("SELECT 1;".into(), "because");
        plan.afterwards.push("restart".into());
        assert_eq!(plan.render(), "-- because\nSELECT 1;\n-- then: restart\n");
    }
}

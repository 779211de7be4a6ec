//! Entity getters for enrichment: which REST method reads the entity an event is about, which
//! parameter takes its id, where the id sits in `EVENT_DATA`, and how "not found" looks.

use serde_json::Value;

/// A getter an `[portals.NAME.enrich]` rule may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Getter {
    CrmDeal,
    CrmLead,
    CrmContact,
    CrmCompany,
    CrmActivity,
    Task,
}

impl Getter {
    /// Every getter, for messages listing the choices.
    pub(crate) const ALL: [Getter; 6] = [
        Getter::CrmDeal,
        Getter::CrmLead,
        Getter::CrmContact,
        Getter::CrmCompany,
        Getter::CrmActivity,
        Getter::Task,
    ];

    /// The REST method, as written in the config.
    pub(crate) fn method(self) -> &'static str {
        match self {
            Getter::CrmDeal => "crm.deal.get",
            Getter::CrmLead => "crm.lead.get",
            Getter::CrmContact => "crm.contact.get",
            Getter::CrmCompany => "crm.company.get",
            Getter::CrmActivity => "crm.activity.get",
            Getter::Task => "tasks.task.get",
        }
    }

    pub(crate) fn from_method(method: &str) -> Option<Getter> {
        Getter::ALL
            .into_iter()
            .find(|g| g.method().eq_ignore_ascii_case(method.trim()))
    }

    /// The parameter that takes the entity id (`tasks.task.get` wants `taskId`).
    pub(super) fn id_param(self) -> &'static str {
        match self {
            Getter::Task => "taskId",
            _ => "id",
        }
    }

    /// The entity in the getter's result: `tasks.task.get` wraps it as `{"task": {...}}`.
    pub(super) fn entity_of(self, result: Value) -> Value {
        match (self, result) {
            (Getter::Task, Value::Object(mut obj)) if obj.contains_key("task") => {
                obj.remove("task").unwrap_or(Value::Null)
            }
            (_, result) => result,
        }
    }
}

/// The id of the entity an event is about: `FIELDS.ID` (CRM events), else `FIELDS_AFTER.ID`
/// (task add/update), else `FIELDS_BEFORE.ID` (task delete). Positive integers only.
pub(crate) fn entity_id(data: &Value) -> Option<u64> {
    ["/FIELDS/ID", "/FIELDS_AFTER/ID", "/FIELDS_BEFORE/ID"]
        .iter()
        .filter_map(|p| data.pointer(p))
        .find_map(|v| match v {
            Value::String(s) => s.trim().parse::<u64>().ok(),
            Value::Number(n) => n.as_u64(),
            _ => None,
        })
        .filter(|id| *id > 0)
}

/// Whether a getter's error means the entity does not exist (deleted since the event): CRM
/// getters answer `{"error": "", "error_description": "Not found"}`, tasks `ERROR_NOT_FOUND` or
/// an access error for a task that is gone.
pub(super) fn is_not_found(code: &str, description: &str) -> bool {
    let code = code.to_ascii_uppercase();
    let description = description.to_ascii_lowercase();
    code == "NOT_FOUND"
        || code == "ERROR_NOT_FOUND"
        || description.contains("not found")
        || description.contains("task not found")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn methods_round_trip_and_tasks_take_task_id() {
        for g in Getter::ALL {
            assert_eq!(Getter::from_method(g.method()), Some(g));
        }
        assert_eq!(Getter::from_method("CRM.Deal.Get"), Some(Getter::CrmDeal));
        assert_eq!(Getter::from_method("crm.deal.list"), None);
        assert_eq!(Getter::Task.id_param(), "taskId");
        assert_eq!(Getter::CrmDeal.id_param(), "id");
    }

    #[test]
    fn entity_ids_come_from_the_event_data() {
        assert_eq!(entity_id(&json!({"FIELDS": {"ID": "45"}})), Some(45));
        assert_eq!(entity_id(&json!({"FIELDS": {"ID": 46}})), Some(46));
        assert_eq!(
            entity_id(&json!({"FIELDS_AFTER": {"ID": "7", "TASK_ID": "7"}})),
            Some(7)
        );
        assert_eq!(entity_id(&json!({"FIELDS_BEFORE": {"ID": "8"}})), Some(8));
        for none in [
            json!(null),
            json!([]),
            json!({"FIELDS": {"ID": "x"}}),
            json!({"FIELDS": {"ID": "0"}}),
            json!({"FIELDS": {}}),
            json!("45"),
        ] {
            assert_eq!(entity_id(&none), None, "{none}");
        }
    }

    #[test]
    fn task_results_are_unwrapped() {
        assert_eq!(
            Getter::Task.entity_of(json!({"task": {"id": "7"}})),
            json!({"id": "7"})
        );
        assert_eq!(
            Getter::CrmDeal.entity_of(json!({"ID": "45"})),
            json!({"ID": "45"})
        );
    }

    #[test]
    fn not_found_is_recognised() {
        assert!(is_not_found("", "Not found"));
        assert!(is_not_found("ERROR_NOT_FOUND", ""));
        assert!(!is_not_found("ACCESS_DENIED", "Access denied"));
        assert!(!is_not_found("INTERNAL_SERVER_ERROR", ""));
    }
}

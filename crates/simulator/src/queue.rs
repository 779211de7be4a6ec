//! The offline event table (`b_rest_event_offline`) and the exact semantics of
//! `event.offline.get/clear/error/list` over it (`modules/rest/lib/eventoffline.php` and
//! `modules/rest/lib/api/event.php` of Bitrix24's rest module), plus the auto-increment re-seed a
//! MySQL restart performs. Pure: the time, the connector of the request and new process ids are
//! passed in.

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, TimeZone};
use serde_json::{Value, json};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::php::{self, Params};
use super::rest::{RestError, iso, portal_now};

/// `IRestService::LIST_LIMIT`: the default `limit` of `get` and the page of `list`.
pub const LIST_LIMIT: usize = 50;

/// The placeholder `markError` parks foreign copies under before deleting them.
const FAKE_PROCESS_ID: &str = "fake_process_id";

/// One queue row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub id: i64,
    pub timestamp_x: DateTime<FixedOffset>,
    pub event_name: String,
    pub event_data: Value,
    pub user_id: i64,
    pub message_id: String,
    pub process_id: String,
    pub error: bool,
    pub connector_id: String,
}

impl Row {
    /// `EVENT_DATA` as the API renders it: `false` when the event carried no data.
    pub fn rendered_data(&self) -> Value {
        let empty = match &self.event_data {
            Value::Null => true,
            Value::Array(items) => items.is_empty(),
            Value::Object(map) => map.is_empty(),
            _ => false,
        };
        if empty {
            Value::Bool(false)
        } else {
            self.event_data.clone()
        }
    }

    pub fn additional(&self) -> Value {
        json!({ "user_id": self.user_id })
    }

    /// The record shape of `event.offline.get`.
    pub fn to_event(&self) -> Value {
        json!({
            "ID": self.id.to_string(),
            "TIMESTAMP_X": iso(&self.timestamp_x),
            "EVENT_NAME": self.event_name,
            "EVENT_DATA": self.rendered_data(),
            "EVENT_ADDITIONAL": self.additional(),
            "MESSAGE_ID": self.message_id,
        })
    }

    /// The record shape of `event.offline.list` (adds `PROCESS_ID` and `ERROR` "0"/"1").
    pub fn to_listed(&self) -> Value {
        let mut v = self.to_event();
        v["PROCESS_ID"] = json!(self.process_id);
        v["ERROR"] = json!(if self.error { "1" } else { "0" });
        v
    }
}

/// `md5(EVENT_NAME . '|' . Json::encode(EVENT_DATA))`.
pub fn message_id(event_name: &str, data: &Value) -> String {
    let encoded = serde_json::to_string(data).unwrap_or_default();
    format!("{:x}", md5::compute(format!("{event_name}|{encoded}")))
}

/// String equality under MySQL's case-insensitive collation.
fn sql_eq(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Id,
    TimestampX,
    EventName,
    MessageId,
    ProcessId,
    Error,
}

impl Field {
    fn parse(name: &str) -> Option<Field> {
        Some(match name {
            "ID" => Field::Id,
            "TIMESTAMP_X" => Field::TimestampX,
            "EVENT_NAME" => Field::EventName,
            "MESSAGE_ID" => Field::MessageId,
            "PROCESS_ID" => Field::ProcessId,
            "ERROR" => Field::Error,
            _ => return None,
        })
    }

    fn text<'r>(&self, row: &'r Row) -> std::borrow::Cow<'r, str> {
        match self {
            Field::Id => row.id.to_string().into(),
            Field::TimestampX => iso(&row.timestamp_x).into(),
            Field::EventName => row.event_name.as_str().into(),
            Field::MessageId => row.message_id.as_str().into(),
            Field::ProcessId => row.process_id.as_str().into(),
            Field::Error => (if row.error { "1" } else { "0" }).into(),
        }
    }

    fn compare(&self, a: &Row, b: &Row) -> Ordering {
        match self {
            Field::Id => a.id.cmp(&b.id),
            Field::TimestampX => a.timestamp_x.cmp(&b.timestamp_x),
            Field::Error => a.error.cmp(&b.error),
            _ => self
                .text(a)
                .to_lowercase()
                .cmp(&self.text(b).to_lowercase()),
        }
    }
}

/// Fields `get` accepts in `filter` and `order`.
pub const GET_FIELDS: &[Field] = &[
    Field::Id,
    Field::TimestampX,
    Field::EventName,
    Field::MessageId,
];
/// Fields `list` accepts.
pub const LIST_FIELDS: &[Field] = &[
    Field::Id,
    Field::TimestampX,
    Field::EventName,
    Field::MessageId,
    Field::ProcessId,
    Field::Error,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Gt,
    Lt,
    Ge,
    Le,
    In,
    Like,
}

#[derive(Debug, Clone, PartialEq)]
enum Operand {
    Int(i64),
    Time(DateTime<FixedOffset>),
    Text(String),
}

#[derive(Debug, Clone, PartialEq)]
struct Cond {
    field: Field,
    op: Op,
    operands: Vec<Operand>,
}

impl Cond {
    fn matches(&self, row: &Row) -> bool {
        match self.op {
            Op::In | Op::Eq => self
                .operands
                .iter()
                .any(|o| self.cmp(row, o) == Some(Ordering::Equal)),
            Op::Like => self.operands.iter().any(|o| match o {
                Operand::Text(needle) => self.field.text(row).to_lowercase().contains(needle),
                _ => false,
            }),
            Op::Gt => self.single(row) == Some(Ordering::Greater),
            Op::Lt => self.single(row) == Some(Ordering::Less),
            Op::Ge => matches!(self.single(row), Some(Ordering::Greater | Ordering::Equal)),
            Op::Le => matches!(self.single(row), Some(Ordering::Less | Ordering::Equal)),
        }
    }

    fn single(&self, row: &Row) -> Option<Ordering> {
        self.operands.first().and_then(|o| self.cmp(row, o))
    }

    /// Row value compared with the operand.
    fn cmp(&self, row: &Row, operand: &Operand) -> Option<Ordering> {
        match (self.field, operand) {
            (Field::Id, Operand::Int(v)) => Some(row.id.cmp(v)),
            (Field::Error, Operand::Int(v)) => Some(i64::from(row.error).cmp(v)),
            (Field::TimestampX, Operand::Time(t)) => Some(row.timestamp_x.cmp(t)),
            (field, Operand::Text(v)) => Some(field.text(row).to_lowercase().cmp(v)),
            _ => None,
        }
    }
}

/// A sanitized `filter` (`IRestService::sanitizeFilter`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter(Vec<Cond>);

impl Filter {
    /// Keys are `<op><FIELD>` with op one of '', =, >, <, >=, <=, @ (in), % (substring).
    pub fn parse(value: &Value, allowed: &[Field]) -> Result<Filter, RestError> {
        if !matches!(value, Value::Object(_) | Value::Array(_)) {
            return Err(RestError::bad_argument("The filter is not an array."));
        }
        let mut conds = Vec::new();
        for (key, v) in php::ordered_entries(value, None) {
            let key = key.to_uppercase();
            let split = key
                .find(|c: char| c.is_ascii_alphabetic())
                .unwrap_or(key.len());
            let (op_text, field_name) = key.split_at(split);
            let op = match op_text {
                "" | "=" => Op::Eq,
                ">" => Op::Gt,
                "<" => Op::Lt,
                ">=" => Op::Ge,
                "<=" => Op::Le,
                "@" => Op::In,
                "%" => Op::Like,
                other => {
                    return Err(RestError::bad_argument(&format!(
                        "Filter operation not allowed: {other}"
                    )));
                }
            };
            let field = Field::parse(field_name)
                .filter(|f| allowed.contains(f))
                .ok_or_else(|| {
                    RestError::bad_argument(&format!("Filter field not allowed: {field_name}"))
                })?;
            let values: Vec<&Value> = match (op, php::array_values(&v)) {
                (Op::In | Op::Eq, Some(list)) => list,
                (_, Some(_)) => {
                    return Err(RestError::argument(
                        &format!("The value of argument '{key}' must be of type string."),
                        &key,
                    ));
                }
                (_, None) => vec![&v],
            };
            let operands = values
                .into_iter()
                .map(|item| operand(field, op, item))
                .collect::<Result<Vec<_>, _>>()?;
            conds.push(Cond {
                field,
                op,
                operands,
            });
        }
        Ok(Filter(conds))
    }

    pub fn matches(&self, row: &Row) -> bool {
        self.0.iter().all(|c| c.matches(row))
    }

    /// The filter without its conditions on `field`.
    pub fn without(self, field: Field) -> Filter {
        Filter(self.0.into_iter().filter(|c| c.field != field).collect())
    }
}

fn operand(field: Field, op: Op, value: &Value) -> Result<Operand, RestError> {
    let text = || php::strval(value).unwrap_or_default();
    if op == Op::Like {
        return Ok(Operand::Text(text().to_lowercase()));
    }
    Ok(match field {
        Field::Id | Field::Error => Operand::Int(php::intval(value)),
        Field::TimestampX => Operand::Time(
            parse_time(&text())
                .ok_or_else(|| RestError::argument("Incorrect date/time value", "TIMESTAMP_X"))?,
        ),
        _ => Operand::Text(text().to_lowercase()),
    })
}

/// `CRestUtil::unConvertDateTime`: ISO-8601, with or without offset (the portal's zone is
/// assumed without), or a bare date.
pub fn parse_time(text: &str) -> Option<DateTime<FixedOffset>> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t);
    }
    if let Ok(t) = DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%z") {
        return Some(t);
    }
    let zone = *portal_now().offset();
    let naive = NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S")
        .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S"))
        .ok()
        .or_else(|| {
            NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .ok()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
        })?;
    zone.from_local_datetime(&naive).single()
}

/// A sanitized `order` (`IRestService::sanitizeOrder`); ties are broken by `ID` ascending.
#[derive(Debug, Clone, PartialEq)]
pub struct Order(Vec<(Field, bool)>);

impl Order {
    pub fn by(field: Field) -> Order {
        Order(vec![(field, false)])
    }

    /// `{FIELD: ASC|DESC}` (keys in the order the client sent them) or `[FIELD, ...]`.
    pub fn parse(
        value: &Value,
        key_order: Option<&[String]>,
        allowed: &[Field],
    ) -> Result<Order, RestError> {
        if !matches!(value, Value::Object(_) | Value::Array(_)) {
            return Err(RestError::bad_argument("The order is not an array."));
        }
        let mut keys = Vec::new();
        for (key, v) in php::ordered_entries(value, key_order) {
            let upper = key.to_uppercase();
            if upper.parse::<i64>().is_ok() {
                let name = php::strval(&v).unwrap_or_default();
                let field = Field::parse(&name)
                    .filter(|f| allowed.contains(f))
                    .ok_or_else(|| {
                        RestError::bad_argument(&format!("Order field not allowed: {name}"))
                    })?;
                keys.push((field, false));
                continue;
            }
            let field = Field::parse(&upper)
                .filter(|f| allowed.contains(f))
                .ok_or_else(|| {
                    RestError::bad_argument(&format!("Order field not allowed: {upper}"))
                })?;
            let desc = match php::strval(&v).unwrap_or_default().to_uppercase().as_str() {
                "ASC" => false,
                "DESC" => true,
                _ => {
                    return Err(RestError::bad_argument(
                        "Order direction should be one of {ASC|DESC}",
                    ));
                }
            };
            keys.push((field, desc));
        }
        Ok(Order(keys))
    }

    /// True when rows come in `ID` ascending order, the table's own: nothing to sort (`ID`
    /// is unique, so whatever follows an `ID ASC` key never decides).
    fn is_by_id(&self) -> bool {
        self.0
            .first()
            .is_none_or(|(field, desc)| *field == Field::Id && !desc)
    }

    /// True when rows come in (`TIMESTAMP_X`, `ID`) ascending order, the order of a get
    /// without `order` (the index of unreserved rows keeps it).
    fn is_by_time(&self) -> bool {
        matches!(
            self.0.as_slice(),
            [(Field::TimestampX, false)] | [(Field::TimestampX, false), (Field::Id, false)]
        )
    }

    fn compare(&self, a: &Row, b: &Row) -> Ordering {
        for (field, desc) in &self.0 {
            let o = field.compare(a, b);
            let o = if *desc { o.reverse() } else { o };
            if o != Ordering::Equal {
                return o;
            }
        }
        a.id.cmp(&b.id)
    }
}

fn process_id_param(params: &Params) -> Result<Option<String>, RestError> {
    match params.get("process_id") {
        None => Ok(None),
        Some(v) => php::strval(v)
            .map(|s| Some(s.trim().to_string()))
            .ok_or_else(|| RestError::argument("Value must be a string", "PROCESS_ID")),
    }
}

/// Parsed `event.offline.get` parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct GetRequest {
    pub filter: Filter,
    pub order: Order,
    pub limit: usize,
    /// `clear` not explicitly 0.
    pub clear: bool,
    /// `error=1`: read the error lane.
    pub error_lane: bool,
    pub process_id: Option<String>,
}

impl GetRequest {
    /// Validation in the server's order: `clear=0` without `rest_offline_extended` is 403
    /// `WRONG_LICENSE`, then `limit`, `filter`, `order`.
    pub fn parse(params: &Params, extended_mode: bool) -> Result<GetRequest, RestError> {
        let clear = params.get("clear").is_none_or(|v| php::intval(v) != 0);
        let process_id = process_id_param(params)?;
        if !clear && !extended_mode {
            return Err(RestError::wrong_license("extended offline events handling"));
        }
        let limit = params.get("limit").map_or(LIST_LIMIT as i64, php::intval);
        let error_lane = params.get("error").is_some_and(|v| php::intval(v) == 1);
        if limit <= 0 {
            return Err(RestError::argument(
                "Value must be positive integer",
                "LIMIT",
            ));
        }
        let filter = match params.get("filter") {
            Some(v) => Filter::parse(v, GET_FIELDS)?,
            None => Filter::default(),
        };
        let order = match params.get("order") {
            Some(v) => Order::parse(v, params.key_order("order"), GET_FIELDS)?,
            None => Order::by(Field::TimestampX),
        };
        Ok(GetRequest {
            filter,
            order,
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            clear,
            error_lane,
            process_id,
        })
    }
}

/// What `event.offline.clear` deletes within the process.
#[derive(Debug, Clone, PartialEq)]
pub enum ClearSelector {
    /// Every row of the process (also when `message_id` or `id` is an empty array).
    All,
    MessageIds(Vec<String>),
    Ids(Vec<i64>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClearRequest {
    pub process_id: String,
    pub selector: ClearSelector,
}

impl ClearRequest {
    /// `message_id` wins over `id` (the code contradicts the docs here).
    pub fn parse(params: &Params) -> Result<ClearRequest, RestError> {
        let process_id =
            process_id_param(params)?.ok_or_else(|| RestError::argument_null("PROCESS_ID"))?;
        let selector = if let Some(value) = params.get("message_id") {
            let items = php::array_values(value).ok_or_else(|| {
                RestError::argument("Value must be array of MESSAGE_ID values", "message_id")
            })?;
            let mut ids = Vec::with_capacity(items.len());
            for item in items {
                let id = php::strval(item)
                    .map(|s| s.trim().to_string())
                    .filter(|s| s.chars().count() == 32)
                    .ok_or_else(|| {
                        // The server names the argument with this typo.
                        RestError::argument(
                            "Value must be array of MESSAGE_ID values",
                            "messsage_id",
                        )
                    })?;
                ids.push(id);
            }
            if ids.is_empty() {
                ClearSelector::All
            } else {
                ClearSelector::MessageIds(ids)
            }
        } else if let Some(value) = params.get("id") {
            let items = php::array_values(value)
                .ok_or_else(|| RestError::argument("Value must be array of integers", "id"))?;
            let mut ids = Vec::with_capacity(items.len());
            for item in items {
                let id = php::intval(item);
                if id <= 0 {
                    return Err(RestError::argument("Value must be array of integers", "id"));
                }
                ids.push(id);
            }
            if ids.is_empty() {
                ClearSelector::All
            } else {
                ClearSelector::Ids(ids)
            }
        } else {
            ClearSelector::All
        };
        Ok(ClearRequest {
            process_id,
            selector,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ErrorRequest {
    pub process_id: String,
    pub message_ids: Vec<String>,
}

impl ErrorRequest {
    pub fn parse(params: &Params) -> Result<ErrorRequest, RestError> {
        let process_id =
            process_id_param(params)?.ok_or_else(|| RestError::argument_null("PROCESS_ID"))?;
        let not_array =
            || RestError::argument("Value must be array of MESSAGE_ID values", "message_id");
        let items = params
            .get("message_id")
            .and_then(php::array_values)
            .ok_or_else(not_array)?;
        let message_ids = items
            .into_iter()
            .map(|v| php::strval(v).ok_or_else(not_array))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ErrorRequest {
            process_id,
            message_ids,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListRequest {
    pub filter: Filter,
    pub order: Order,
    /// The `start` the REST server lifted out of the query.
    pub start: i64,
}

impl ListRequest {
    pub fn parse(params: &Params, start: i64) -> Result<ListRequest, RestError> {
        let filter = match params.get("filter") {
            Some(v) => Filter::parse(v, LIST_FIELDS)?,
            None => Filter::default(),
        };
        let order = match params.get("order") {
            Some(v) => Order::parse(v, params.key_order("order"), LIST_FIELDS)?,
            None => Order::by(Field::Id),
        };
        Ok(ListRequest {
            filter,
            order,
            start,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GetOutcome {
    /// `null` for a fresh reservation with `clear` not 0; echoed when `process_id` was given.
    pub process_id: Option<String>,
    pub events: Vec<Row>,
    /// Rows deleted by the `clear` step.
    pub deleted: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListOutcome {
    pub rows: Vec<Row>,
    pub total: usize,
    pub next: Option<usize>,
}

/// What `push` did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Inserted(i64),
    Merged(i64),
}

/// The key rows with an empty `PROCESS_ID` are unique on: (MESSAGE_ID, CONNECTOR_ID),
/// case-folded as the collation compares them.
fn merge_key(message_id: &str, connector: &str) -> (String, String) {
    (
        message_id.to_ascii_lowercase(),
        connector.to_ascii_lowercase(),
    )
}

/// The table: rows by autoincrement `ID`, and an index of the unreserved rows by their
/// merge key (the part of the unique key `push` hits).
#[derive(Debug, Clone, Default)]
pub struct Queue {
    rows: BTreeMap<i64, Row>,
    unreserved: HashMap<(String, String), i64>,
    /// The unreserved rows in the order a `get` without `order` takes them (`TIMESTAMP_X`,
    /// then `ID`): a reservation reads the first `limit` of them instead of sorting the table,
    /// so a backlog of 100,000 rows costs a get what a backlog of 100 does.
    unreserved_by_time: BTreeSet<(DateTime<FixedOffset>, i64)>,
    /// The IDs of the reserved rows by `PROCESS_ID` (ASCII-lowercased, as the column compares):
    /// a clear looks at its reservation's rows, not at the whole table.
    reserved: HashMap<String, BTreeSet<i64>>,
    last_id: i64,
}

impl Queue {
    pub fn new() -> Queue {
        Queue::default()
    }

    pub fn rows(&self) -> impl Iterator<Item = &Row> {
        self.rows.values()
    }

    /// What MySQL before 8.0 does to an InnoDB table at server start: the auto-increment
    /// counter is re-seeded from the rows present, `MAX(ID) + 1` (1 when the table is empty), so
    /// the IDs of rows deleted since come back for new events. Returns the next ID.
    pub fn reseed_ids(&mut self) -> i64 {
        self.last_id = self.rows.keys().next_back().copied().unwrap_or(0);
        self.last_id + 1
    }

    /// `callEvent`: `INSERT … ON DUPLICATE KEY UPDATE TIMESTAMP_X, EVENT_DATA,
    /// EVENT_ADDITIONAL` on the key (MESSAGE_ID, CONNECTOR_ID, PROCESS_ID) with PROCESS_ID
    /// '' — so a change merges into the unreserved row (keeping its ID and ERROR) and a
    /// change while the row is reserved inserts a new one.
    pub fn push(
        &mut self,
        event_name: &str,
        data: Value,
        user_id: i64,
        connector: &str,
        now: DateTime<FixedOffset>,
    ) -> Pushed {
        let message_id = message_id(event_name, &data);
        let key = merge_key(&message_id, connector);
        if let Some(row) = self
            .unreserved
            .get(&key)
            .and_then(|id| self.rows.get_mut(id))
        {
            self.unreserved_by_time.remove(&(row.timestamp_x, row.id));
            self.unreserved_by_time.insert((now, row.id));
            row.timestamp_x = now;
            row.event_data = data;
            row.user_id = user_id;
            return Pushed::Merged(row.id);
        }
        self.last_id += 1;
        let id = self.last_id;
        self.unreserved.insert(key, id);
        self.unreserved_by_time.insert((now, id));
        self.rows.insert(
            id,
            Row {
                id,
                timestamp_x: now,
                event_name: event_name.to_string(),
                event_data: data,
                user_id,
                message_id,
                process_id: String::new(),
                error: false,
                connector_id: connector.to_string(),
            },
        );
        Pushed::Inserted(id)
    }

    fn sorted<'a>(&'a self, keep: impl Fn(&Row) -> bool, order: &Order) -> Vec<&'a Row> {
        let mut rows: Vec<&Row> = self.rows.values().filter(|r| keep(r)).collect();
        rows.sort_by(|a, b| order.compare(a, b));
        rows
    }

    /// The first `limit` rows `keep` holds in `order`: what `sorted` gives, cut to `limit`,
    /// without sorting (or looking past the `limit`th row) when the order is the table's own.
    /// (A get without `order` is ordered by `TIMESTAMP_X`, as on the server, and still sorts.)
    fn first<'a>(
        &'a self,
        keep: impl Fn(&Row) -> bool,
        order: &Order,
        limit: usize,
    ) -> Vec<&'a Row> {
        if order.is_by_id() {
            return self.rows.values().filter(|r| keep(r)).take(limit).collect();
        }
        let mut rows = self.sorted(keep, order);
        rows.truncate(limit);
        rows
    }

    fn delete_where(&mut self, pred: impl Fn(&Row) -> bool) -> usize {
        let doomed: Vec<i64> = self
            .rows
            .values()
            .filter(|r| pred(r))
            .map(|r| r.id)
            .collect();
        self.delete_ids(&doomed)
    }

    fn delete_ids(&mut self, doomed: &[i64]) -> usize {
        for id in doomed {
            if let Some(row) = self.rows.remove(id) {
                if row.process_id.is_empty() {
                    self.unreserved
                        .remove(&merge_key(&row.message_id, &row.connector_id));
                    self.unreserved_by_time.remove(&(row.timestamp_x, row.id));
                } else {
                    self.unindex_reserved(&row.process_id, row.id);
                }
            }
        }
        doomed.len()
    }

    fn unindex_reserved(&mut self, process_id: &str, id: i64) {
        let key = process_id.to_ascii_lowercase();
        if let Some(ids) = self.reserved.get_mut(&key) {
            ids.remove(&id);
            if ids.is_empty() {
                self.reserved.remove(&key);
            }
        }
    }

    /// Sets a row's `PROCESS_ID`, keeping the index of unreserved rows.
    fn set_process_id(&mut self, id: i64, process_id: &str) {
        let Some(row) = self.rows.get_mut(&id) else {
            return;
        };
        let key = merge_key(&row.message_id, &row.connector_id);
        let by_time = (row.timestamp_x, id);
        let previous = std::mem::replace(&mut row.process_id, process_id.to_string());
        if previous.is_empty() {
            self.unreserved.remove(&key);
            self.unreserved_by_time.remove(&by_time);
        } else {
            self.unindex_reserved(&previous, id);
        }
        if process_id.is_empty() {
            self.unreserved.insert(key, id);
            self.unreserved_by_time.insert(by_time);
        } else {
            self.reserved
                .entry(process_id.to_ascii_lowercase())
                .or_default()
                .insert(id);
        }
    }

    /// The rows reserved under `process_id`, from the index (`None` for the empty id: the
    /// unreserved rows, which that index does not hold).
    fn reserved_rows<'a>(&'a self, process_id: &str) -> Option<impl Iterator<Item = &'a Row>> {
        if process_id.is_empty() {
            return None;
        }
        Some(
            self.reserved
                .get(&process_id.to_ascii_lowercase())
                .into_iter()
                .flatten()
                .filter_map(|id| self.rows.get(id)),
        )
    }

    /// `eventOfflineGet`. Without `process_id`: reserve up to `limit` unreserved rows of the
    /// lane under a new id (for `clear` 0 and 1 alike), select them, and with `clear` delete
    /// them before answering. With `process_id`: select that process's rows; with `clear`
    /// (and at least one row selected) delete **all** rows of the process, beyond `limit` too.
    pub fn get(
        &mut self,
        req: &GetRequest,
        connector: &str,
        new_process_id: impl FnOnce() -> String,
    ) -> GetOutcome {
        let in_lane = |r: &Row| sql_eq(&r.connector_id, connector) && r.error == req.error_lane;
        let (process_id, fresh) = match &req.process_id {
            Some(pid) => (pid.clone(), false),
            None => (new_process_id(), true),
        };
        if fresh {
            let keep = |r: &Row| in_lane(r) && r.process_id.is_empty() && req.filter.matches(r);
            let marked: Vec<i64> = if req.order.is_by_time() {
                self.unreserved_by_time
                    .iter()
                    .map(|(_, id)| &self.rows[id])
                    .filter(|r| keep(r))
                    .take(req.limit)
                    .map(|r| r.id)
                    .collect()
            } else {
                self.first(keep, &req.order, req.limit)
                    .into_iter()
                    .map(|r| r.id)
                    .collect()
            };
            for id in marked {
                self.set_process_id(id, &process_id);
            }
        }
        let selected =
            |r: &Row| in_lane(r) && sql_eq(&r.process_id, &process_id) && req.filter.matches(r);
        let events: Vec<Row> = match self.reserved_rows(&process_id) {
            // A reservation's rows from the index, sorted among themselves.
            Some(rows) => {
                let mut rows: Vec<&Row> = rows.filter(|r| selected(r)).collect();
                rows.sort_by(|a, b| req.order.compare(a, b));
                rows.into_iter().take(req.limit).cloned().collect()
            }
            None => self
                .first(selected, &req.order, req.limit)
                .into_iter()
                .cloned()
                .collect(),
        };
        let deleted = if req.clear && !events.is_empty() {
            let doomed: Vec<i64> = match self.reserved_rows(&process_id) {
                Some(rows) => rows
                    .filter(|r| sql_eq(&r.connector_id, connector))
                    .map(|r| r.id)
                    .collect(),
                None => self
                    .rows
                    .values()
                    .filter(|r| {
                        sql_eq(&r.process_id, &process_id) && sql_eq(&r.connector_id, connector)
                    })
                    .map(|r| r.id)
                    .collect(),
            };
            self.delete_ids(&doomed)
        } else {
            0
        };
        GetOutcome {
            process_id: if fresh && req.clear {
                None
            } else {
                Some(process_id)
            },
            events,
            deleted,
        }
    }

    /// `eventOfflineClear`: deletes the process's rows of this connector (all, or those
    /// listed). Returns the number of rows deleted (the API answers `true` regardless).
    pub fn clear(&mut self, req: &ClearRequest, connector: &str) -> usize {
        let doomed = |r: &Row| {
            sql_eq(&r.process_id, &req.process_id)
                && sql_eq(&r.connector_id, connector)
                && match &req.selector {
                    ClearSelector::All => true,
                    ClearSelector::MessageIds(ids) => ids.iter().any(|m| sql_eq(m, &r.message_id)),
                    ClearSelector::Ids(ids) => ids.contains(&r.id),
                }
        };
        if req.process_id.is_empty() {
            // `PROCESS_ID = ''`: the unreserved rows, which the index does not hold.
            return self.delete_where(doomed);
        }
        let ids: Vec<i64> = self
            .reserved
            .get(&req.process_id.to_ascii_lowercase())
            .into_iter()
            .flatten()
            .filter_map(|id| self.rows.get(id))
            .filter(|r| doomed(r))
            .map(|r| r.id)
            .collect();
        self.delete_ids(&ids)
    }

    /// `EventOfflineTable::cleanProcessAgent` (daily on the portal): deletes every reserved row
    /// whose `TIMESTAMP_X` is before `cutoff` (now less `PROCESS_ID_LIFETIME`, 2,952,000 s).
    /// `TIMESTAMP_X` is the last change before the reservation, so an old event reserved late
    /// goes soon after. Returns the rows deleted.
    pub fn purge_reservations(&mut self, cutoff: DateTime<FixedOffset>) -> usize {
        self.delete_where(|r| !r.process_id.is_empty() && r.timestamp_x < cutoff)
    }

    /// `markError`, statement by statement:
    /// 1. delete every other non-error copy of those MESSAGE_IDs (`PROCESS_ID <> pid`);
    /// 2. `ERROR=1`, and `PROCESS_ID` '' for the caller's rows, 'fake_process_id' otherwise;
    /// 3. delete the 'fake_process_id' rows.
    ///
    /// Returns the number of rows moved to the error lane.
    pub fn error(&mut self, req: &ErrorRequest, connector: &str) -> Result<usize, RestError> {
        if req.message_ids.is_empty() {
            return Ok(0);
        }
        let pid = req.process_id.as_str();
        let scoped = |r: &Row| {
            sql_eq(&r.connector_id, connector)
                && req.message_ids.iter().any(|m| sql_eq(m, &r.message_id))
        };
        self.delete_where(|r| scoped(r) && !r.error && !sql_eq(&r.process_id, pid));

        let targets: Vec<i64> = self
            .rows
            .values()
            .filter(|r| scoped(r) && !r.error)
            .map(|r| r.id)
            .collect();
        // The UPDATE must not create a second row on the unique key.
        for id in &targets {
            let row = &self.rows[id];
            let key = merge_key(&row.message_id, &row.connector_id);
            let clash = self.unreserved.get(&key).is_some_and(|other| other != id);
            if sql_eq(&row.process_id, pid) && clash {
                return Err(RestError::sql());
            }
        }
        let mut moved = 0;
        for id in targets {
            let Some(row) = self.rows.get_mut(&id) else {
                continue;
            };
            row.error = true;
            if sql_eq(&row.process_id, pid) {
                self.set_process_id(id, "");
                moved += 1;
            } else {
                self.set_process_id(id, FAKE_PROCESS_ID);
            }
        }
        self.delete_where(|r| scoped(r) && r.process_id == FAKE_PROCESS_ID);
        Ok(moved)
    }

    /// `eventOfflineList`: read-only, 50 per page from `start`, both lanes unless filtered.
    pub fn list(&self, req: &ListRequest, connector: &str) -> ListOutcome {
        let matching = self.sorted(
            |r| sql_eq(&r.connector_id, connector) && req.filter.matches(r),
            &req.order,
        );
        let total = matching.len();
        let offset = usize::try_from(req.start.max(0)).unwrap_or(usize::MAX);
        let rows: Vec<Row> = matching
            .into_iter()
            .skip(offset)
            .take(LIST_LIMIT)
            .cloned()
            .collect();
        let next = (offset.saturating_add(rows.len()) < total).then(|| offset + rows.len());
        ListOutcome { rows, total, next }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rest::portal_time;

    const T0: i64 = 1_800_000_000;

    fn t(offset: i64) -> DateTime<FixedOffset> {
        portal_time(T0 + offset)
    }

    fn change(id: u64) -> Value {
        json!({"FIELDS": {"ID": id.to_string()}})
    }

    fn params(v: Value) -> Params {
        Params::from_value(v)
    }

    fn get_req(v: Value) -> GetRequest {
        GetRequest::parse(&params(v), true).expect("valid get")
    }

    fn pid(s: &str) -> impl FnOnce() -> String + '_ {
        move || s.to_string()
    }

    /// Three deals changed at t0, t0+1, t0+2 on the connector-less queue.
    fn queue3() -> Queue {
        let mut q = Queue::new();
        for i in 0..3 {
            q.push("ONCRMDEALUPDATE", change(10 + i as u64), 1, "", t(i));
        }
        q
    }

    /// The index of unreserved rows matches the table.
    fn consistent(q: &Queue) -> bool {
        let expected: HashMap<(String, String), i64> = q
            .rows()
            .filter(|r| r.process_id.is_empty())
            .map(|r| (merge_key(&r.message_id, &r.connector_id), r.id))
            .collect();
        let by_time: BTreeSet<(DateTime<FixedOffset>, i64)> = q
            .rows()
            .filter(|r| r.process_id.is_empty())
            .map(|r| (r.timestamp_x, r.id))
            .collect();
        let reserved: HashMap<String, BTreeSet<i64>> = q
            .rows()
            .filter(|r| !r.process_id.is_empty())
            .fold(HashMap::new(), |mut m, r| {
                m.entry(r.process_id.to_ascii_lowercase())
                    .or_default()
                    .insert(r.id);
                m
            });
        expected == q.unreserved && by_time == q.unreserved_by_time && reserved == q.reserved
    }

    fn ids(rows: &[Row]) -> Vec<i64> {
        rows.iter().map(|r| r.id).collect()
    }

    #[test]
    fn message_id_is_md5_of_name_and_json() {
        let data = change(45);
        let expected = format!(
            "{:x}",
            md5::compute(r#"ONCRMDEALUPDATE|{"FIELDS":{"ID":"45"}}"#)
        );
        assert_eq!(message_id("ONCRMDEALUPDATE", &data), expected);
        assert_eq!(expected.len(), 32);
    }

    #[test]
    fn repeated_change_merges_into_one_row_keeping_id() {
        let mut q = Queue::new();
        assert_eq!(
            q.push("ONCRMDEALUPDATE", change(1), 1, "", t(0)),
            Pushed::Inserted(1)
        );
        assert_eq!(
            q.push("ONCRMDEALUPDATE", change(2), 1, "", t(1)),
            Pushed::Inserted(2)
        );
        assert_eq!(
            q.push("ONCRMDEALUPDATE", change(1), 7, "", t(5)),
            Pushed::Merged(1)
        );
        let rows: Vec<&Row> = q.rows().collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].timestamp_x, t(5));
        assert_eq!(rows[0].user_id, 7);
        // Default order TIMESTAMP_X ASC: the merged row now comes last although its ID is 1.
        let out = q.get(&get_req(json!({"clear": 0})), "", pid("p1"));
        assert_eq!(ids(&out.events), [2, 1]);
    }

    #[test]
    fn different_event_names_and_connectors_do_not_merge() {
        let mut q = Queue::new();
        q.push("ONCRMDEALADD", change(1), 1, "", t(0));
        q.push("ONCRMDEALUPDATE", change(1), 1, "", t(0));
        q.push("ONCRMDEALUPDATE", change(1), 1, "erp", t(0));
        assert_eq!(q.rows().count(), 3);
    }

    #[test]
    fn a_change_while_reserved_creates_a_new_row() {
        let mut q = Queue::new();
        q.push("ONCRMDEALUPDATE", change(1), 1, "", t(0));
        let first = q.get(&get_req(json!({"clear": 0})), "", pid("p1"));
        assert_eq!(ids(&first.events), [1]);
        assert_eq!(
            q.push("ONCRMDEALUPDATE", change(1), 1, "", t(1)),
            Pushed::Inserted(2)
        );
        // A second change merges into the new unreserved row, not into the reserved one.
        assert_eq!(
            q.push("ONCRMDEALUPDATE", change(1), 1, "", t(2)),
            Pushed::Merged(2)
        );
        let second = q.get(&get_req(json!({"clear": 0})), "", pid("p2"));
        assert_eq!(ids(&second.events), [2]);
        assert_eq!(second.events[0].message_id, first.events[0].message_id);
    }

    #[test]
    fn change_merges_into_error_row_and_keeps_error() {
        let mut q = Queue::new();
        q.push("ONCRMDEALUPDATE", change(1), 1, "", t(0));
        let got = q.get(&get_req(json!({"clear": 0})), "", pid("p1"));
        let mid = got.events[0].message_id.clone();
        let req =
            ErrorRequest::parse(&params(json!({"process_id": "p1", "message_id": [mid]}))).unwrap();
        assert_eq!(q.error(&req, "").unwrap(), 1);
        assert_eq!(
            q.push("ONCRMDEALUPDATE", change(1), 2, "", t(9)),
            Pushed::Merged(1)
        );
        let row = q.rows().next().unwrap();
        assert!(row.error);
        assert_eq!(row.timestamp_x, t(9));
        // Invisible to a plain get, visible with error=1.
        assert!(
            q.get(&get_req(json!({"clear": 0})), "", pid("p2"))
                .events
                .is_empty()
        );
        let lane = q.get(&get_req(json!({"clear": 0, "error": 1})), "", pid("p3"));
        assert_eq!(ids(&lane.events), [1]);
    }

    #[test]
    fn get_with_clear_reserves_selects_and_deletes() {
        let mut q = queue3();
        let out = q.get(&get_req(json!({"limit": 2})), "", pid("p1"));
        assert_eq!(out.process_id, None);
        assert_eq!(ids(&out.events), [1, 2]);
        assert_eq!(out.deleted, 2);
        assert_eq!(q.rows().map(|r| r.id).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn get_clear_0_reserves_and_hides_from_later_gets() {
        let mut q = queue3();
        let a = q.get(&get_req(json!({"clear": "0", "limit": 2})), "", pid("pa"));
        assert_eq!(a.process_id.as_deref(), Some("pa"));
        assert_eq!(ids(&a.events), [1, 2]);
        assert_eq!(a.deleted, 0);
        let b = q.get(&get_req(json!({"clear": 0})), "", pid("pb"));
        assert_eq!(ids(&b.events), [3]);
        let c = q.get(&get_req(json!({"clear": 0})), "", pid("pc"));
        assert!(c.events.is_empty());
        assert_eq!(c.process_id.as_deref(), Some("pc"));
        assert_eq!(q.rows().filter(|r| r.process_id == "pa").count(), 2);
    }

    #[test]
    fn get_with_process_id_re_gets_the_reserved_rows() {
        let mut q = queue3();
        q.get(&get_req(json!({"clear": 0})), "", pid("p1"));
        let again = q.get(
            &get_req(json!({"clear": 0, "process_id": " p1 ", "limit": 2})),
            "",
            pid("unused"),
        );
        assert_eq!(again.process_id.as_deref(), Some("p1"));
        assert_eq!(ids(&again.events), [1, 2]);
        assert_eq!(q.rows().count(), 3);
    }

    #[test]
    fn get_with_process_id_and_clear_deletes_the_whole_process() {
        let mut q = queue3();
        q.get(&get_req(json!({"clear": 0})), "", pid("p1"));
        q.push("ONCRMDEALUPDATE", change(99), 1, "", t(10));
        let out = q.get(
            &get_req(json!({"process_id": "p1", "limit": 1})),
            "",
            pid("unused"),
        );
        // One row returned, all three of the process deleted; the process id is echoed.
        assert_eq!(ids(&out.events), [1]);
        assert_eq!(out.deleted, 3);
        assert_eq!(out.process_id.as_deref(), Some("p1"));
        assert_eq!(q.rows().map(|r| r.id).collect::<Vec<_>>(), [4]);
    }

    #[test]
    fn get_with_unknown_process_id_deletes_nothing() {
        let mut q = queue3();
        let out = q.get(&get_req(json!({"process_id": "nope"})), "", pid("unused"));
        assert!(out.events.is_empty());
        assert_eq!(out.deleted, 0);
        assert_eq!(q.rows().count(), 3);
    }

    #[test]
    fn empty_process_id_addresses_the_unreserved_rows() {
        // PHP checks `process_id === null`, so "" selects PROCESS_ID='' and, with clear,
        // deletes every unreserved row of the connector (both lanes).
        let mut q = queue3();
        q.get(&get_req(json!({"clear": 0, "limit": 1})), "", pid("p1"));
        let out = q.get(
            &get_req(json!({"process_id": "", "limit": 1})),
            "",
            pid("unused"),
        );
        assert_eq!(ids(&out.events), [2]);
        assert_eq!(out.deleted, 2);
        assert_eq!(q.rows().map(|r| r.id).collect::<Vec<_>>(), [1]);
        let mut q = queue3();
        let clear = ClearRequest::parse(&params(json!({"process_id": " "}))).unwrap();
        assert_eq!(q.clear(&clear, ""), 3);
    }

    #[test]
    fn get_is_scoped_by_connector() {
        let mut q = Queue::new();
        q.push("ONCRMDEALUPDATE", change(1), 1, "erp", t(0));
        q.push("ONCRMDEALUPDATE", change(2), 1, "", t(0));
        let plain = q.get(&get_req(json!({"clear": 0})), "", pid("p1"));
        assert_eq!(ids(&plain.events), [2]);
        let erp = q.get(&get_req(json!({"clear": 0})), "erp", pid("p2"));
        assert_eq!(ids(&erp.events), [1]);
        // clear with the wrong connector deletes nothing.
        let clear = ClearRequest::parse(&params(json!({"process_id": "p2"}))).unwrap();
        assert_eq!(q.clear(&clear, ""), 0);
        assert_eq!(q.clear(&clear, "erp"), 1);
    }

    #[test]
    fn get_validates_limit_license_filter_and_order() {
        let bad_limit = GetRequest::parse(&params(json!({"limit": 0})), true).unwrap_err();
        assert_eq!(
            (bad_limit.status, bad_limit.code.as_str()),
            (400, "ERROR_ARGUMENT")
        );
        assert_eq!(bad_limit.argument.as_deref(), Some("LIMIT"));
        let license =
            GetRequest::parse(&params(json!({"clear": 0, "limit": 0})), false).unwrap_err();
        assert_eq!(
            (license.status, license.code.as_str()),
            (403, "WRONG_LICENSE")
        );
        assert!(GetRequest::parse(&params(json!({"clear": 1})), false).is_ok());
        let op = GetRequest::parse(&params(json!({"filter": {"!ID": 1}})), true).unwrap_err();
        assert_eq!(op.description, "Filter operation not allowed: !");
        let field =
            GetRequest::parse(&params(json!({"filter": {"PROCESS_ID": ""}})), true).unwrap_err();
        assert_eq!(field.description, "Filter field not allowed: PROCESS_ID");
        let not_array = GetRequest::parse(&params(json!({"filter": "x"})), true).unwrap_err();
        assert_eq!(not_array.description, "The filter is not an array.");
        let order = GetRequest::parse(&params(json!({"order": {"ID": "UP"}})), true).unwrap_err();
        assert_eq!(
            order.description,
            "Order direction should be one of {ASC|DESC}"
        );
        let order_field =
            GetRequest::parse(&params(json!({"order": {"ERROR": "ASC"}})), true).unwrap_err();
        assert_eq!(order_field.description, "Order field not allowed: ERROR");
        // No upper clamp on limit.
        assert_eq!(get_req(json!({"limit": "5000"})).limit, 5000);
    }

    #[test]
    fn get_filters_and_orders() {
        let mut q = queue3();
        q.push("ONCRMLEADADD", change(5), 1, "", t(3));
        let by_id = q.get(
            &get_req(json!({"clear": 0, "filter": {">=ID": 2, "<ID": "4"}})),
            "",
            pid("a"),
        );
        assert_eq!(ids(&by_id.events), [2, 3]);
        let by_name = q.get(
            &get_req(json!({"clear": 0, "filter": {"%EVENT_NAME": "lead"}})),
            "",
            pid("b"),
        );
        assert_eq!(ids(&by_name.events), [4]);
        let mut q = queue3();
        let since = iso(&t(1));
        let by_time = q.get(
            &get_req(json!({"clear": 0, "filter": {">=TIMESTAMP_X": since}})),
            "",
            pid("c"),
        );
        assert_eq!(ids(&by_time.events), [2, 3]);
        let mut q = queue3();
        let desc = q.get(
            &get_req(json!({"clear": 0, "order": {"ID": "desc"}, "limit": 2})),
            "",
            pid("d"),
        );
        assert_eq!(ids(&desc.events), [3, 2]);
        let mut q = queue3();
        let in_list = q.get(
            &get_req(json!({"clear": 0, "filter": {"@ID": ["1", "3"]}})),
            "",
            pid("e"),
        );
        assert_eq!(ids(&in_list.events), [1, 3]);
        let mut q = queue3();
        let mid = message_id("ONCRMDEALUPDATE", &change(11));
        let by_mid = q.get(
            &get_req(json!({"clear": 0, "filter": {"=MESSAGE_ID": mid.to_uppercase()}})),
            "",
            pid("f"),
        );
        assert_eq!(ids(&by_mid.events), [2]);
    }

    #[test]
    fn event_shape_and_empty_data_is_false() {
        let mut q = Queue::new();
        q.push("ONAPPTEST", Value::Null, 0, "", t(0));
        q.push("ONCRMDEALUPDATE", change(45), 1, "", t(0));
        let out = q.get(&get_req(json!({})), "", pid("p"));
        let first = out.events[0].to_event();
        assert_eq!(first["EVENT_DATA"], json!(false));
        assert_eq!(first["EVENT_ADDITIONAL"], json!({"user_id": 0}));
        let second = out.events[1].to_event();
        assert_eq!(second["ID"], json!("2"));
        assert_eq!(second["EVENT_DATA"], change(45));
        assert_eq!(second["TIMESTAMP_X"], json!(iso(&t(0))));
        assert!(second.get("PROCESS_ID").is_none());
        assert!(second.get("ERROR").is_none());
        assert_eq!(second.as_object().unwrap().len(), 6);
    }

    #[test]
    fn clear_validation() {
        let missing = ClearRequest::parse(&params(json!({"message_id": []}))).unwrap_err();
        assert_eq!(missing.argument.as_deref(), Some("PROCESS_ID"));
        assert_eq!(missing.status, 400);
        let not_array =
            ClearRequest::parse(&params(json!({"process_id": "p", "message_id": "abc"})))
                .unwrap_err();
        assert_eq!(
            not_array.description,
            "Value must be array of MESSAGE_ID values"
        );
        let short = ClearRequest::parse(&params(json!({"process_id": "p", "message_id": ["abc"]})))
            .unwrap_err();
        assert_eq!(short.argument.as_deref(), Some("messsage_id"));
        let bad_id =
            ClearRequest::parse(&params(json!({"process_id": "p", "id": ["0"]}))).unwrap_err();
        assert_eq!(bad_id.description, "Value must be array of integers");
        let ids_not_array =
            ClearRequest::parse(&params(json!({"process_id": "p", "id": 5}))).unwrap_err();
        assert_eq!(ids_not_array.argument.as_deref(), Some("id"));
        let mid = "a".repeat(32);
        let both = ClearRequest::parse(&params(
            json!({"process_id": "p", "message_id": [mid], "id": [1]}),
        ))
        .unwrap();
        assert_eq!(
            both.selector,
            ClearSelector::MessageIds(vec!["a".repeat(32)])
        );
        let empty =
            ClearRequest::parse(&params(json!({"process_id": "p", "message_id": []}))).unwrap();
        assert_eq!(empty.selector, ClearSelector::All);
    }

    #[test]
    fn clear_by_message_id_id_or_whole_process() {
        let mut q = queue3();
        let out = q.get(&get_req(json!({"clear": 0})), "", pid("p1"));
        let m2 = out.events[1].message_id.clone();
        let by_mid =
            ClearRequest::parse(&params(json!({"process_id": "p1", "message_id": [m2]}))).unwrap();
        assert_eq!(q.clear(&by_mid, ""), 1);
        let by_id = ClearRequest::parse(&params(json!({"process_id": "p1", "id": ["3"]}))).unwrap();
        assert_eq!(q.clear(&by_id, ""), 1);
        let other = ClearRequest::parse(&params(json!({"process_id": "p2"}))).unwrap();
        assert_eq!(q.clear(&other, ""), 0);
        let all = ClearRequest::parse(&params(json!({"process_id": "p1"}))).unwrap();
        assert_eq!(q.clear(&all, ""), 1);
        assert_eq!(q.rows().count(), 0);
    }

    #[test]
    fn error_validation() {
        let missing = ErrorRequest::parse(&params(json!({"message_id": []}))).unwrap_err();
        assert_eq!(missing.argument.as_deref(), Some("PROCESS_ID"));
        let not_array = ErrorRequest::parse(&params(json!({"process_id": "p", "message_id": "x"})))
            .unwrap_err();
        assert_eq!(not_array.argument.as_deref(), Some("message_id"));
        let absent = ErrorRequest::parse(&params(json!({"process_id": "p"}))).unwrap_err();
        assert_eq!(absent.code, "ERROR_ARGUMENT");
        // No 32-character check here, and an empty list is a no-op.
        let short =
            ErrorRequest::parse(&params(json!({"process_id": "p", "message_id": [2]}))).unwrap();
        assert_eq!(short.message_ids, ["2"]);
        let mut q = queue3();
        let empty =
            ErrorRequest::parse(&params(json!({"process_id": "p", "message_id": []}))).unwrap();
        assert_eq!(q.error(&empty, "").unwrap(), 0);
        assert_eq!(q.rows().count(), 3);
    }

    #[test]
    fn error_runs_its_three_statements() {
        let mut q = Queue::new();
        // Rows 1 (deal 1) and 2 (deal 4) reserved by process A, row 3 (a later change of
        // deal 1) reserved by process B, row 4 (yet another change of deal 1) unreserved.
        q.push("ONCRMDEALUPDATE", change(1), 1, "", t(0));
        q.push("ONCRMDEALUPDATE", change(4), 1, "", t(0));
        q.get(&get_req(json!({"clear": 0})), "", pid("A"));
        q.push("ONCRMDEALUPDATE", change(1), 1, "", t(1));
        q.get(&get_req(json!({"clear": 0})), "", pid("B"));
        q.push("ONCRMDEALUPDATE", change(1), 1, "", t(2));
        let mid = message_id("ONCRMDEALUPDATE", &change(1));
        let state = |q: &Queue| -> Vec<(i64, String, bool)> {
            q.rows()
                .map(|r| (r.id, r.process_id.clone(), r.error))
                .collect()
        };
        assert_eq!(
            state(&q),
            [
                (1, "A".into(), false),
                (2, "A".into(), false),
                (3, "B".into(), false),
                (4, String::new(), false)
            ]
        );
        let req =
            ErrorRequest::parse(&params(json!({"process_id": "A", "message_id": [mid]}))).unwrap();
        assert_eq!(q.error(&req, "").unwrap(), 1);
        // 1: the copy reserved by B and the fresh unreserved copy are deleted;
        // 2: A's copy is in the error lane and unreserved; row 2 (another entity) untouched.
        assert_eq!(
            state(&q),
            [(1, String::new(), true), (2, "A".into(), false)]
        );
        // clear by message_id after error matches nothing: the row is no longer reserved.
        let clear = ClearRequest::parse(&params(
            json!({"process_id": "A", "message_id": [message_id("ONCRMDEALUPDATE", &change(1))]}),
        ))
        .unwrap();
        assert_eq!(q.clear(&clear, ""), 0);
    }

    #[test]
    fn error_on_error_lane_reservation_does_nothing() {
        let mut q = Queue::new();
        q.push("ONCRMDEALUPDATE", change(1), 1, "", t(0));
        q.get(&get_req(json!({"clear": 0})), "", pid("A"));
        let mid = message_id("ONCRMDEALUPDATE", &change(1));
        let req = ErrorRequest::parse(&params(
            json!({"process_id": "A", "message_id": [mid.clone()]}),
        ))
        .unwrap();
        q.error(&req, "").unwrap();
        let lane = q.get(&get_req(json!({"clear": 0, "error": 1})), "", pid("E"));
        assert_eq!(ids(&lane.events), [1]);
        let again =
            ErrorRequest::parse(&params(json!({"process_id": "E", "message_id": [mid]}))).unwrap();
        assert_eq!(q.error(&again, "").unwrap(), 0);
        let row = q.rows().next().unwrap();
        assert_eq!((row.process_id.as_str(), row.error), ("E", true));
    }

    #[test]
    fn list_filters_pages_and_shows_process_and_error() {
        let mut q = Queue::new();
        for i in 0..120 {
            q.push("ONCRMDEALUPDATE", change(i), 1, "", t(0));
        }
        q.push("ONCRMDEALUPDATE", change(500), 1, "erp", t(0));
        let first = q.list(&ListRequest::parse(&params(json!({})), 0).unwrap(), "");
        assert_eq!(
            (first.rows.len(), first.total, first.next),
            (50, 120, Some(50))
        );
        assert_eq!(first.rows[0].id, 1);
        let last = q.list(&ListRequest::parse(&params(json!({})), 100).unwrap(), "");
        assert_eq!((last.rows.len(), last.total, last.next), (20, 120, None));
        let negative = q.list(&ListRequest::parse(&params(json!({})), -5).unwrap(), "");
        assert_eq!(negative.rows[0].id, 1);
        let erp = q.list(&ListRequest::parse(&params(json!({})), 0).unwrap(), "erp");
        assert_eq!(erp.total, 1);

        q.get(&get_req(json!({"clear": 0, "limit": 3})), "", pid("p1"));
        let reserved = q.list(
            &ListRequest::parse(&params(json!({"filter": {">PROCESS_ID": ""}})), 0).unwrap(),
            "",
        );
        assert_eq!(ids(&reserved.rows), [1, 2, 3]);
        let listed = reserved.rows[0].to_listed();
        assert_eq!(listed["PROCESS_ID"], json!("p1"));
        assert_eq!(listed["ERROR"], json!("0"));
        let errors = q.list(
            &ListRequest::parse(&params(json!({"filter": {"ERROR": 1}})), 0).unwrap(),
            "",
        );
        assert_eq!(errors.total, 0);
        let desc = q.list(
            &ListRequest::parse(&params(json!({"order": {"ID": "DESC"}})), 0).unwrap(),
            "",
        );
        assert_eq!(desc.rows[0].id, 120);
        let bad =
            ListRequest::parse(&params(json!({"filter": {"CONNECTOR_ID": "x"}})), 0).unwrap_err();
        assert_eq!(bad.description, "Filter field not allowed: CONNECTOR_ID");
    }

    /// `Queue::get` as it was before its indexes: every row scanned and sorted. The random
    /// test plays each get on a copy through this and compares.
    fn get_by_scan(
        q: &mut Queue,
        req: &GetRequest,
        connector: &str,
        process_id: &str,
    ) -> GetOutcome {
        let in_lane = |r: &Row| sql_eq(&r.connector_id, connector) && r.error == req.error_lane;
        let fresh = req.process_id.is_none();
        if fresh {
            let marked: Vec<i64> = q
                .first(
                    |r| in_lane(r) && r.process_id.is_empty() && req.filter.matches(r),
                    &req.order,
                    req.limit,
                )
                .into_iter()
                .map(|r| r.id)
                .collect();
            for id in marked {
                q.set_process_id(id, process_id);
            }
        }
        let events: Vec<Row> = q
            .first(
                |r| in_lane(r) && sql_eq(&r.process_id, process_id) && req.filter.matches(r),
                &req.order,
                req.limit,
            )
            .into_iter()
            .cloned()
            .collect();
        let deleted = if req.clear && !events.is_empty() {
            q.delete_where(|r| {
                sql_eq(&r.process_id, process_id) && sql_eq(&r.connector_id, connector)
            })
        } else {
            0
        };
        GetOutcome {
            process_id: if fresh && req.clear {
                None
            } else {
                Some(process_id.to_string())
            },
            events,
            deleted,
        }
    }

    #[test]
    fn random_operations_keep_the_unique_key_and_the_index() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut q = Queue::new();
        let mut processes: Vec<String> = Vec::new();
        let names = ["ONCRMDEALUPDATE", "ONCRMDEALADD"];
        let connectors = ["", "erp"];
        for step in 0..3000 {
            let connector = connectors[rng.usize(..2)];
            let mid = message_id(names[rng.usize(..2)], &change(rng.u64(1..15)));
            match rng.u8(..6) {
                0..=2 => {
                    q.push(
                        names[rng.usize(..2)],
                        change(rng.u64(1..15)),
                        1,
                        connector,
                        t(step / 5), // ties on TIMESTAMP_X, broken by ID
                    );
                }
                3 => {
                    let p = format!("p{step}");
                    let mut req =
                        json!({"clear": rng.u8(..2), "limit": rng.u8(1..6), "error": rng.u8(..2)});
                    if rng.u8(..4) == 0 && !processes.is_empty() {
                        // A re-get of an earlier reservation (in another case, as the column
                        // compares), or of the unreserved rows by the empty id.
                        let earlier = &processes[rng.usize(..processes.len())];
                        req["process_id"] = json!(match rng.u8(..3) {
                            0 => String::new(),
                            1 => earlier.to_ascii_uppercase(),
                            _ => earlier.clone(),
                        });
                    }
                    if rng.bool() {
                        req["order"] = json!({"TIMESTAMP_X": "ASC"});
                    }
                    let req = get_req(req);
                    let mut scanned = q.clone();
                    let pid = req.process_id.clone().unwrap_or_else(|| p.clone());
                    let expected = get_by_scan(&mut scanned, &req, connector, &pid);
                    let got = q.get(&req, connector, || p.clone());
                    assert_eq!(got, expected, "get at {step} answers as the scan does");
                    assert_eq!(
                        q.rows().collect::<Vec<_>>(),
                        scanned.rows().collect::<Vec<_>>(),
                        "get at {step} leaves the table as the scan does"
                    );
                    processes.push(p);
                }
                4 if !processes.is_empty() => {
                    let p = &processes[rng.usize(..processes.len())];
                    let req = if rng.bool() {
                        json!({"process_id": p})
                    } else {
                        json!({"process_id": p, "message_id": [mid]})
                    };
                    q.clear(&ClearRequest::parse(&params(req)).unwrap(), connector);
                }
                5 if !processes.is_empty() => {
                    let p = &processes[rng.usize(..processes.len())];
                    let req = json!({"process_id": p, "message_id": [mid]});
                    q.error(&ErrorRequest::parse(&params(req)).unwrap(), connector)
                        .expect("no unique-key clash is reachable");
                }
                _ => {}
            }
            assert!(consistent(&q), "index out of step at {step}");
            let mut keys = std::collections::HashSet::new();
            for r in q.rows() {
                let key = (
                    r.message_id.clone(),
                    r.connector_id.clone(),
                    r.process_id.clone(),
                );
                assert!(keys.insert(key), "unique key violated at {step}");
            }
        }
    }

    #[test]
    fn the_purge_deletes_old_reservations_only() {
        let mut q = queue3();
        let out = q.get(&get_req(json!({"clear": 0, "limit": 2})), "", pid("p1"));
        assert_eq!(ids(&out.events), vec![1, 2]);
        // Reserved and last changed before the cutoff: row 1 only.
        assert_eq!(q.purge_reservations(t(1)), 1);
        assert_eq!(q.rows().map(|r| r.id).collect::<Vec<_>>(), vec![2, 3]);
        assert!(consistent(&q));
        // Rows without a reservation are never purged, however old.
        let mut q = queue3();
        assert_eq!(q.purge_reservations(t(100)), 0);
    }

    #[test]
    fn reseeding_ids_brings_back_the_ids_of_deleted_rows() {
        let mut q = Queue::new();
        for id in 1..=3 {
            q.push("ONCRMDEALUPDATE", change(id), 1, "", t(0));
        }
        // Without a restart an ID is never handed out twice.
        let out = q.get(&get_req(json!({"clear": 1})), "", pid("p1"));
        assert_eq!(out.deleted, 3);
        assert_eq!(
            q.push("ONCRMDEALUPDATE", change(4), 1, "", t(1)),
            Pushed::Inserted(4)
        );
        // A restart with row 4 present: the counter goes on from 5, as before.
        assert_eq!(q.reseed_ids(), 5);
        assert_eq!(
            q.push("ONCRMDEALUPDATE", change(5), 1, "", t(1)),
            Pushed::Inserted(5)
        );
        // Rows 4 and 5 cleared, then a restart: the empty table starts again at 1.
        q.get(&get_req(json!({"clear": 1})), "", pid("p2"));
        assert_eq!(q.rows().count(), 0);
        assert_eq!(q.reseed_ids(), 1);
        assert_eq!(
            q.push("ONCRMDEALADD", change(6), 1, "", t(2)),
            Pushed::Inserted(1)
        );
        assert_eq!(
            q.push("ONCRMDEALADD", change(7), 1, "", t(2)),
            Pushed::Inserted(2)
        );
        // A gap below the highest row is not filled: MAX(ID) + 1.
        let mid = message_id("ONCRMDEALADD", &change(6));
        q.get(
            &get_req(json!({"clear": 1, "filter": {"=MESSAGE_ID": mid}})),
            "",
            pid("p3"),
        );
        assert_eq!(ids(&q.rows().cloned().collect::<Vec<_>>()), [2]);
        assert_eq!(q.reseed_ids(), 3);
        assert!(consistent(&q));
    }

    #[test]
    fn order_keeps_the_clients_key_order() {
        let p = Params::from_form("order[EVENT_NAME]=DESC&order[ID]=ASC");
        let req = ListRequest::parse(&p, 0).unwrap();
        assert_eq!(
            req.order,
            Order(vec![(Field::EventName, true), (Field::Id, false)])
        );
    }
}

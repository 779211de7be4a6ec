//! The offline queue's methods: `event.offline.get/clear/error/list`, alone or as sub-commands of
//! one `batch` request ([`PortalClient::offline_batch`]), the enrichment getters in a `batch`
//! ([`PortalClient::get_entities`]), and `batch` itself, which charges each sub-command's
//! operating time to its own method.

use super::PortalClient;
use crate::bitrix::entities::{self, Getter};
use crate::bitrix::error::{BitrixError, codes};
use crate::bitrix::form;
use crate::bitrix::operating::Answered;
use crate::bitrix::types::{
    self, ApiResponse, BatchResponse, ListPage, OfflineBatch, parse_batch, parse_offline_get,
    parse_offline_list,
};
use serde_json::{Map, Value, json};

/// Sub-commands per `batch` request (`CRestUtil::BATCH_MAX_LENGTH`).
pub(crate) const MAX_BATCH: usize = 50;

/// Parameters of `event.offline.get`.
#[derive(Debug, Clone, PartialEq)]
pub struct GetRequest {
    pub limit: u32,
    /// `true` deletes what is returned (fetch-delete mode); `false` reserves it (`process_id`).
    pub clear: bool,
    /// Re-read the rows already reserved under this id.
    pub process_id: Option<String>,
    /// Read the error lane (`error=1`).
    pub error_lane: bool,
}

/// One `event.offline.*` call, alone or as a sub-command of [`PortalClient::offline_batch`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum OfflineCommand {
    Get(GetRequest),
    Clear {
        process_id: String,
        target: ClearTarget,
    },
    Error {
        process_id: String,
        message_ids: Vec<String>,
    },
}

impl OfflineCommand {
    pub(crate) fn method(&self) -> &'static str {
        match self {
            OfflineCommand::Get(_) => "event.offline.get",
            OfflineCommand::Clear { .. } => "event.offline.clear",
            OfflineCommand::Error { .. } => "event.offline.error",
        }
    }

    /// The start of the command's key in a `batch` request.
    fn key_prefix(&self) -> &'static str {
        match self {
            OfflineCommand::Get(_) => "get",
            OfflineCommand::Clear { .. } => "clear",
            OfflineCommand::Error { .. } => "error",
        }
    }

    /// A settle call naming no rows (nothing to send).
    fn is_empty(&self) -> bool {
        match self {
            OfflineCommand::Get(_) => false,
            OfflineCommand::Clear { target, .. } => match target {
                ClearTarget::All => false,
                ClearTarget::MessageIds(ids) => ids.is_empty(),
                ClearTarget::Ids(ids) => ids.is_empty(),
            },
            OfflineCommand::Error { message_ids, .. } => message_ids.is_empty(),
        }
    }
}

/// The answer to [`PortalClient::offline_batch`].
#[derive(Debug)]
pub(crate) struct OfflineBatchAnswer {
    /// One per command, in order.
    pub(crate) outcomes: Vec<OfflineOutcome>,
}

/// How one sub-command of [`PortalClient::offline_batch`] came out.
#[derive(Debug)]
pub(crate) enum OfflineOutcome {
    /// A `get` answered (its reservation and events).
    Got(OfflineBatch),
    /// A `clear` or `error` was done.
    Settled,
    /// The portal refused or failed this sub-command alone (the others ran).
    Failed(BitrixError),
}

/// What a getter in [`PortalClient::get_entities`] came to.
#[derive(Debug)]
pub(crate) enum EntityOutcome {
    Found(Value),
    /// The entity does not exist (deleted since the event): the text says which.
    NotFound(String),
    Failed(BitrixError),
}

/// Which rows of a reservation `event.offline.clear` deletes.
#[derive(Debug, Clone, PartialEq)]
pub enum ClearTarget {
    All,
    MessageIds(Vec<String>),
    Ids(Vec<i64>),
}

impl PortalClient {
    /// `event.offline.get`: `clear` and `error` go as 0/1.
    pub async fn offline_get(&self, req: &GetRequest) -> Result<OfflineBatch, BitrixError> {
        let (method, params) = self.offline_params(&OfflineCommand::Get(req.clone()))?;
        let resp = self.call(method, params).await?;
        parse_offline_get(&resp.result).map_err(|e| self.shape_error(method, e))
    }

    /// `event.offline.clear` of a reservation: all of it, or the given `message_id`s or `id`s
    /// (never both). An empty id list clears nothing and sends no request.
    pub async fn offline_clear(
        &self,
        process_id: &str,
        target: &ClearTarget,
    ) -> Result<(), BitrixError> {
        let command = OfflineCommand::Clear {
            process_id: process_id.to_string(),
            target: target.clone(),
        };
        let (method, params) = self.offline_params(&command)?;
        if command.is_empty() {
            return Ok(());
        }
        self.call(method, params).await.map(|_| ())
    }

    /// `event.offline.error`: moves these rows of the reservation to the error lane. An empty
    /// list sends no request (the server would do nothing).
    pub(crate) async fn offline_error(
        &self,
        process_id: &str,
        message_ids: &[String],
    ) -> Result<(), BitrixError> {
        let command = OfflineCommand::Error {
            process_id: process_id.to_string(),
            message_ids: message_ids.to_vec(),
        };
        let (method, params) = self.offline_params(&command)?;
        if command.is_empty() {
            return Ok(());
        }
        self.call(method, params).await.map(|_| ())
    }

    /// Several `event.offline.*` calls in one `batch` request (one tick of the portal's
    /// bucket; each sub-command is charged to its own method's operating budget). Sub-commands
    /// run in order under the request's `auth_connector`; one failing does not stop the others.
    /// Returns one outcome per command, in order. Empty settle commands are refused: leave them
    /// out.
    pub(crate) async fn offline_batch(
        &self,
        commands: &[OfflineCommand],
    ) -> Result<OfflineBatchAnswer, BitrixError> {
        let mut sub = Vec::with_capacity(commands.len());
        for (i, command) in commands.iter().enumerate() {
            let (method, params) = self.offline_params(command)?;
            if command.is_empty() {
                return Err(BitrixError::new(
                    self.portal(),
                    method,
                    codes::INVALID_PARAMS,
                    "a settle sub-command with no events".to_string(),
                    None,
                ));
            }
            // String keys: PHP would turn sequential numeric keys into a JSON list. The number
            // comes first, zero-padded, so that the keys sort in command order: the body's `cmd`
            // object is serialized with sorted keys, and the portal runs them in that order.
            sub.push((
                format!("{i:02}{}", command.key_prefix()),
                method.to_string(),
                params,
            ));
        }
        let resp = self.batch(&sub, false).await?;
        let outcomes = sub
            .iter()
            .zip(commands)
            .map(|((key, method, _), command)| {
                if let Some((code, description)) = resp.errors.get(key) {
                    return OfflineOutcome::Failed(BitrixError::from_api(
                        self.portal(),
                        method,
                        code,
                        description,
                        None,
                    ));
                }
                let Some(result) = resp.results.get(key) else {
                    return OfflineOutcome::Failed(
                        self.shape_error(method, format!("no result for sub-command {key}")),
                    );
                };
                match command {
                    OfflineCommand::Get(_) => match parse_offline_get(result) {
                        Ok(batch) => OfflineOutcome::Got(batch),
                        Err(e) => OfflineOutcome::Failed(self.shape_error(method, e)),
                    },
                    OfflineCommand::Clear { .. } | OfflineCommand::Error { .. } => {
                        OfflineOutcome::Settled
                    }
                }
            })
            .collect();
        Ok(OfflineBatchAnswer { outcomes })
    }

    /// Reads up to 50 entities in one `batch` request (one sub-command per entity; callers
    /// deduplicate). Returns one outcome per key, in order.
    pub(crate) async fn get_entities(
        &self,
        keys: &[(Getter, u64)],
    ) -> Result<Vec<EntityOutcome>, BitrixError> {
        let commands: Vec<(String, String, Value)> = keys
            .iter()
            .enumerate()
            .map(|(i, (getter, id))| {
                (
                    format!("entity{i}"),
                    getter.method().to_string(),
                    json!({ getter.id_param(): id }),
                )
            })
            .collect();
        let resp = self.batch(&commands, false).await?;
        Ok(commands
            .iter()
            .zip(keys)
            .map(|((key, method, _), (getter, id))| {
                if let Some((code, description)) = resp.errors.get(key) {
                    if entities::is_not_found(code, description) {
                        return EntityOutcome::NotFound(format!(
                            "{method} {id}: not found ({})",
                            if description.is_empty() {
                                code
                            } else {
                                description
                            }
                        ));
                    }
                    return EntityOutcome::Failed(BitrixError::from_api(
                        self.portal(),
                        method,
                        code,
                        description,
                        None,
                    ));
                }
                match resp.results.get(key) {
                    Some(result) => EntityOutcome::Found(getter.entity_of(result.clone())),
                    None => EntityOutcome::Failed(
                        self.shape_error(method, format!("no result for sub-command {key}")),
                    ),
                }
            })
            .collect())
    }

    /// The REST method and parameters of an `event.offline.*` call.
    fn offline_params(
        &self,
        command: &OfflineCommand,
    ) -> Result<(&'static str, Value), BitrixError> {
        let method = command.method();
        Ok(match command {
            OfflineCommand::Get(req) => {
                let mut params = json!({
                    "limit": req.limit,
                    "clear": u8::from(req.clear),
                    "error": u8::from(req.error_lane),
                });
                if let Some(pid) = &req.process_id {
                    self.require_process_id(method, pid)?;
                    params["process_id"] = Value::String(pid.clone());
                }
                (method, params)
            }
            OfflineCommand::Clear { process_id, target } => {
                self.require_process_id(method, process_id)?;
                let mut params = json!({ "process_id": process_id });
                match target {
                    ClearTarget::All => {}
                    ClearTarget::MessageIds(ids) => params["message_id"] = json!(ids),
                    ClearTarget::Ids(ids) => params["id"] = json!(ids),
                }
                (method, params)
            }
            OfflineCommand::Error {
                process_id,
                message_ids,
            } => {
                self.require_process_id(method, process_id)?;
                (
                    method,
                    json!({ "process_id": process_id, "message_id": message_ids }),
                )
            }
        })
    }

    /// One page of `event.offline.list` (ordered by `ID` ascending), from `start`.
    pub(crate) async fn offline_list(
        &self,
        filter: Value,
        start: u64,
    ) -> Result<ListPage, BitrixError> {
        const METHOD: &str = "event.offline.list";
        let filter = if filter.is_null() { json!({}) } else { filter };
        let params = json!({ "filter": filter, "order": {"ID": "ASC"}, "start": start });
        let resp = self.call(METHOD, params).await?;
        parse_offline_list(&resp).map_err(|e| self.shape_error(METHOD, e))
    }

    /// Pages of `event.offline.list` in `order` (one field, e.g. `{"PROCESS_ID": "ASC"}`): one
    /// `(filter, start)` per page, sent together in one `batch` request (a single page alone).
    /// Returns one page or error per query, in order.
    pub(crate) async fn offline_list_pages(
        &self,
        order: &Value,
        queries: &[(Value, u64)],
    ) -> Result<Vec<Result<ListPage, BitrixError>>, BitrixError> {
        const METHOD: &str = "event.offline.list";
        let params = |filter: &Value, start: u64| json!({ "filter": filter, "order": order, "start": start });
        if let [(filter, start)] = queries {
            let resp = self.call(METHOD, params(filter, *start)).await?;
            return Ok(vec![
                parse_offline_list(&resp).map_err(|e| self.shape_error(METHOD, e)),
            ]);
        }
        let commands: Vec<(String, String, Value)> = queries
            .iter()
            .enumerate()
            .map(|(i, (filter, start))| {
                (
                    format!("{i:02}list"),
                    METHOD.to_string(),
                    params(filter, *start),
                )
            })
            .collect();
        let resp = self.batch(&commands, false).await?;
        Ok(commands
            .iter()
            .map(|(key, _, _)| {
                if let Some((code, description)) = resp.errors.get(key) {
                    return Err(BitrixError::from_api(
                        self.portal(),
                        METHOD,
                        code,
                        description,
                        None,
                    ));
                }
                let Some(result) = resp.results.get(key) else {
                    return Err(
                        self.shape_error(METHOD, format!("no result for sub-command {key}"))
                    );
                };
                let page = ApiResponse {
                    result: result.clone(),
                    total: resp.totals.get(key).copied(),
                    next: resp.nexts.get(key).copied(),
                    time: resp.times.get(key).cloned().unwrap_or_default(),
                    waited: 0.0,
                };
                parse_offline_list(&page).map_err(|e| self.shape_error(METHOD, e))
            })
            .collect())
    }

    /// One `batch` request of up to 50 `(key, method, params)` sub-commands, each sent as
    /// `method?<PHP bracket query>`. Sub-command failures are in [`BatchResponse::errors`].
    pub(crate) async fn batch(
        &self,
        commands: &[(String, String, Value)],
        halt: bool,
    ) -> Result<BatchResponse, BitrixError> {
        const METHOD: &str = "batch";
        if commands.len() > MAX_BATCH {
            return Err(BitrixError::new(
                self.portal(),
                METHOD,
                codes::BATCH_LENGTH_EXCEEDED,
                format!(
                    "{} sub-commands, at most {MAX_BATCH} allowed",
                    commands.len()
                ),
                None,
            ));
        }
        if commands.is_empty() {
            return Ok(BatchResponse::default());
        }
        let mut cmd = Map::new();
        for (key, method, params) in commands {
            if key.is_empty() || cmd.contains_key(key) {
                return Err(BitrixError::new(
                    self.portal(),
                    METHOD,
                    codes::INVALID_PARAMS,
                    format!("sub-command key {key:?} is empty or used twice"),
                    None,
                ));
            }
            let query = form::encode(params);
            let line = if query.is_empty() {
                method.clone()
            } else {
                format!("{method}?{query}")
            };
            cmd.insert(key.clone(), Value::String(line));
        }
        let resp = self
            .call(METHOD, json!({ "cmd": cmd, "halt": u8::from(halt) }))
            .await?;
        let parsed = parse_batch(&resp.result).map_err(|e| self.shape_error(METHOD, e))?;
        // Each sub-command is charged to its own method's operating budget; the portal runs
        // them in the order of their keys (the `cmd` object is written with sorted keys).
        let mut ran: Vec<&(String, String, Value)> = commands.iter().collect();
        ran.sort_by(|a, b| a.0.cmp(&b.0));
        let stamped: Vec<(&str, Option<&types::TimeInfo>)> = ran
            .iter()
            .map(|(key, method, _)| (method.as_str(), parsed.times.get(key)))
            .collect();
        self.record_answer(
            Answered {
                method: METHOD,
                time: &resp.time,
                waited: resp.waited,
            },
            &stamped,
        );
        for (key, method, _) in &ran {
            if let Some((code, _)) = parsed.errors.get(key)
                && code.eq_ignore_ascii_case("OPERATION_TIME_LIMIT")
            {
                self.operating_refused(method, None);
            }
        }
        Ok(parsed)
    }

    /// An empty `process_id` is dangerous: the server only checks that one was sent, so `""`
    /// addresses every unreserved row (a clear would delete the whole queue). Never send one.
    fn require_process_id(&self, method: &str, process_id: &str) -> Result<(), BitrixError> {
        if process_id.trim().is_empty() {
            return Err(BitrixError::new(
                self.portal(),
                method,
                codes::INVALID_PARAMS,
                "refusing to send an empty process_id (it would address every unreserved event)"
                    .to_string(),
                None,
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use crate::bitrix::ErrorClass;
    use crate::bitrix::client::lock;

    #[tokio::test]
    async fn an_empty_process_id_is_never_sent() {
        let (base, srv) = serve(|_, _| ok(json!(true))).await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 3600)), &srv);
        let all = ClearTarget::All;
        let err = client.offline_clear("", &all).await.unwrap_err();
        assert_eq!(err.code, codes::INVALID_PARAMS);
        let err = client
            .offline_error(" ", &["m".repeat(32)])
            .await
            .unwrap_err();
        assert_eq!(err.code, codes::INVALID_PARAMS);
        let get = GetRequest {
            limit: 10,
            clear: false,
            process_id: Some(String::new()),
            error_lane: false,
        };
        assert_eq!(
            client.offline_get(&get).await.unwrap_err().code,
            codes::INVALID_PARAMS
        );
        assert!(
            log(&srv).is_empty(),
            "no request reached the portal: {:?}",
            log(&srv)
        );
    }

    #[tokio::test]
    async fn offline_methods_send_the_documented_parameters() {
        let (base, srv) = serve(|seen, _| match seen.path.as_str() {
            "/rest/event.offline.get" => json_reply(
                200,
                json!({"result": {"process_id": "pid1", "events": [{
                    "ID": "1", "TIMESTAMP_X": "2024-07-18T12:32:31+02:00", "EVENT_NAME": "ONCRMLEADADD",
                    "EVENT_DATA": false, "EVENT_ADDITIONAL": false, "MESSAGE_ID": "1"}]}, "time": {}}),
            ),
            "/rest/event.offline.list" => json_reply(200, json!({"result": [], "total": 0, "time": {}})),
            _ => ok(json!(true)),
        })
        .await;
        let mut s = settings(&base);
        s.auth_connector = Some("erp-sync".into());
        let (client, _) = client_with(s, Some(tokens("a1", "r1", 3600)), &srv);
        let batch = client
            .offline_get(&GetRequest {
                limit: 25,
                clear: false,
                process_id: None,
                error_lane: true,
            })
            .await
            .unwrap();
        assert_eq!(batch.process_id.as_deref(), Some("pid1"));
        assert_eq!(batch.events[0].data, Value::Null);
        client
            .offline_get(&GetRequest {
                limit: 5,
                clear: true,
                process_id: Some("pid1".into()),
                error_lane: false,
            })
            .await
            .unwrap();
        client
            .offline_clear("pid1", &ClearTarget::MessageIds(vec!["m".repeat(32)]))
            .await
            .unwrap();
        client
            .offline_clear("pid1", &ClearTarget::Ids(vec![1, 2]))
            .await
            .unwrap();
        client
            .offline_clear("pid1", &ClearTarget::All)
            .await
            .unwrap();
        client
            .offline_clear("pid1", &ClearTarget::Ids(vec![]))
            .await
            .unwrap();
        client
            .offline_error("pid1", &["x".repeat(32)])
            .await
            .unwrap();
        client.offline_error("pid1", &[]).await.unwrap();
        client.offline_list(json!({"ERROR": 1}), 50).await.unwrap();
        client
            .call("crm.deal.update", json!({"id": 1, "auth_connector": null}))
            .await
            .unwrap();

        let seen = lock(&srv.seen).clone();
        let bodies: Vec<Value> = seen.iter().map(|s| s.body.clone()).collect();
        assert_eq!(bodies.len(), 8);
        assert_eq!(
            bodies[0],
            json!({"limit": 25, "clear": 0, "error": 1, "auth": "a1", "auth_connector": "erp-sync"})
        );
        assert_eq!(
            bodies[1],
            json!({"limit": 5, "clear": 1, "error": 0, "process_id": "pid1", "auth": "a1", "auth_connector": "erp-sync"})
        );
        assert_eq!(
            bodies[2],
            json!({"process_id": "pid1", "message_id": ["m".repeat(32)], "auth": "a1", "auth_connector": "erp-sync"})
        );
        assert_eq!(
            bodies[3],
            json!({"process_id": "pid1", "id": [1, 2], "auth": "a1", "auth_connector": "erp-sync"})
        );
        assert_eq!(
            bodies[4],
            json!({"process_id": "pid1", "auth": "a1", "auth_connector": "erp-sync"})
        );
        assert_eq!(seen[5].path, "/rest/event.offline.error");
        assert_eq!(
            bodies[5],
            json!({"process_id": "pid1", "message_id": ["x".repeat(32)], "auth": "a1", "auth_connector": "erp-sync"})
        );
        assert_eq!(
            bodies[6],
            json!({"filter": {"ERROR": 1}, "order": {"ID": "ASC"}, "start": 50, "auth": "a1", "auth_connector": "erp-sync"})
        );
        assert_eq!(bodies[7], json!({"id": 1, "auth": "a1"}));
        let headers = &seen[0].headers;
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["accept"], "application/json");
        assert!(
            headers["user-agent"]
                .to_str()
                .unwrap()
                .starts_with("b24eventd/")
        );
        assert!(seen.iter().all(|s| s.method == "POST"));
    }

    #[tokio::test]
    async fn batch_sends_query_string_subcommands() {
        let (base, srv) = serve(|_, _| {
            json_reply(
                200,
                json!({"result": {
                    "result": {"get": {"process_id": "p2", "events": []}, "clear": true},
                    "result_error": [], "result_total": [], "result_next": [], "result_time": []
                }, "time": {}}),
            )
        })
        .await;
        let mut s = settings(&base);
        s.auth_connector = Some("erp-sync".into());
        let (client, _) = client_with(s, Some(tokens("a1", "r1", 3600)), &srv);
        let commands = vec![
            (
                "clear".to_string(),
                "event.offline.clear".to_string(),
                json!({"process_id": "p1", "message_id": ["a", "b"]}),
            ),
            (
                "get".to_string(),
                "event.offline.get".to_string(),
                json!({"clear": 0, "limit": 50}),
            ),
            ("info".to_string(), "app.info".to_string(), json!({})),
        ];
        let resp = client.batch(&commands, false).await.unwrap();
        assert_eq!(resp.results["clear"], json!(true));
        assert_eq!(
            parse_offline_get(&resp.results["get"])
                .unwrap()
                .process_id
                .as_deref(),
            Some("p2")
        );
        let body = lock(&srv.seen)[0].body.clone();
        assert_eq!(
            body,
            json!({
                "cmd": {
                    "clear": "event.offline.clear?message_id[0]=a&message_id[1]=b&process_id=p1",
                    "get": "event.offline.get?clear=0&limit=50",
                    "info": "app.info"
                },
                "halt": 0, "auth": "a1", "auth_connector": "erp-sync"
            })
        );
        let too_many: Vec<_> = (0..51)
            .map(|i| (format!("k{i}"), "app.info".to_string(), json!({})))
            .collect();
        let err = client.batch(&too_many, true).await.unwrap_err();
        assert_eq!(
            (err.class, err.code.as_str()),
            (ErrorClass::Rejected, "ERROR_BATCH_LENGTH_EXCEEDED")
        );
        let dup = vec![
            ("a".to_string(), "app.info".to_string(), json!({})),
            ("a".to_string(), "app.info".to_string(), json!({})),
        ];
        assert!(client.batch(&dup, false).await.is_err());
        assert_eq!(log(&srv).len(), 1);
    }
}

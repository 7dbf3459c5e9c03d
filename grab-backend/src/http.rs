//! The HTTP API over any [`Store`].
//!
//! | route | answer |
//! |---|---|
//! | `POST /envelopes` | 201 summary; 400 `{"error":"invalid_request","reason":..}`; with `Idempotency-Key`: a repeat answers the first 201, 422 `idempotency_key_reused` |
//! | `POST /envelopes/{id}/grab` | 200 receipt; 400 missing user; 404; 410 `empty`/`expired` |
//! | `GET /envelopes/{id}?offset=&limit=` | 200 summary + page of grabs; 404 |
//! | `GET /users/{id}/wallet?limit=` | 200 settled balance + recent credits |
//! | `GET /healthz` | 200, or 503 once storage failed; settlement lag |
//! | `GET /stats` | 200 money totals (conservation check) |
//!
//! Storage failures answer 503 `{"error":"unavailable"}`: the client may
//! retry, and a retried grab is idempotent; a retried create is when it carries an
//! `Idempotency-Key` header (scoped to the sender; see `docs/grab-backend.md`).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use crate::config::{Config, Limits};
use crate::model::EnvelopeId;
use crate::store::{
    CreateError, CreateRequest, GrabError, IdempotencyKey, NewEnvelope, Store, StoreError,
};

/// The header that makes `POST /envelopes` idempotent.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Page size when a request names none.
const DEFAULT_PAGE: usize = 100;

struct AppState<S> {
    store: Arc<S>,
    user_header: HeaderName,
    limits: Arc<Limits>,
}

#[derive(Debug, Deserialize)]
struct PageQuery {
    offset: Option<usize>,
    limit: Option<usize>,
}

// === impl AppState ===

impl<S> Clone for AppState<S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            user_header: self.user_header.clone(),
            limits: self.limits.clone(),
        }
    }
}

/// The grab API as an axum router over `store`.
///
/// Fails only if `config.user_header` is not a valid header name.
pub fn router<S: Store>(store: Arc<S>, config: &Config) -> anyhow::Result<Router> {
    let user_header = HeaderName::try_from(config.user_header.to_ascii_lowercase())
        .map_err(|e| anyhow::anyhow!("user header {:?}: {e}", config.user_header))?;
    let state = AppState {
        store,
        user_header,
        limits: Arc::new(config.limits.clone()),
    };
    Ok(Router::new()
        .route("/envelopes", post(create::<S>))
        .route("/envelopes/{id}", get(envelope::<S>))
        .route("/envelopes/{id}/grab", post(grab::<S>))
        .route("/users/{id}/wallet", get(wallet::<S>))
        .route("/healthz", get(healthz::<S>))
        .route("/stats", get(stats::<S>))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found") })
        .with_state(state))
}

async fn create<S: Store>(
    State(st): State<AppState<S>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut keys = headers.get_all(IDEMPOTENCY_KEY).iter();
    let raw_key = keys.next();
    if keys.next().is_some() {
        return invalid("at most one Idempotency-Key header");
    }
    let req: CreateRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return invalid(&e.to_string()),
    };
    let key = match raw_key.map(|k| IdempotencyKey::new(k.as_bytes(), &req)) {
        None => None,
        Some(Ok(k)) => Some(k),
        Some(Err(e)) => return invalid(&e.0),
    };
    let new = match NewEnvelope::validate(req, &st.limits) {
        Ok(n) => n,
        Err(e) => return invalid(&e.0),
    };
    let Some(key) = key else {
        return match st.store.create(new).await {
            Ok(summary) => (StatusCode::CREATED, axum::Json(summary)).into_response(),
            Err(e) => store_error(e),
        };
    };
    match st.store.create_idempotent(new, &key).await {
        Ok(created) => (StatusCode::CREATED, axum::Json(created.summary)).into_response(),
        Err(CreateError::KeyReused) => json_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was used for a different request",
        ),
        Err(CreateError::Unavailable(why)) => store_error(StoreError::Unavailable(why)),
    }
}

async fn grab<S: Store>(
    State(st): State<AppState<S>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Ok(id) = id.parse::<EnvelopeId>() else {
        return error(StatusCode::NOT_FOUND, "not_found");
    };
    let user = headers
        .get(&st.user_header)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .unwrap_or("");
    if user.is_empty() {
        return json_error(
            StatusCode::BAD_REQUEST,
            "missing_user",
            &format!("header {} is required", st.user_header),
        );
    }
    if user.len() > st.limits.max_user_id_bytes {
        return invalid(&format!(
            "user id must be at most {} bytes",
            st.limits.max_user_id_bytes
        ));
    }
    match st.store.grab(id, user).await {
        Ok(receipt) => (StatusCode::OK, axum::Json(receipt)).into_response(),
        Err(GrabError::NotFound) => error(StatusCode::NOT_FOUND, "not_found"),
        Err(GrabError::Empty) => error(StatusCode::GONE, "empty"),
        Err(GrabError::Expired) => error(StatusCode::GONE, "expired"),
        Err(GrabError::Unavailable(why)) => store_error(StoreError::Unavailable(why)),
    }
}

async fn envelope<S: Store>(
    State(st): State<AppState<S>>,
    Path(id): Path<String>,
    Query(page): Query<PageQuery>,
) -> Response {
    let Ok(id) = id.parse::<EnvelopeId>() else {
        return error(StatusCode::NOT_FOUND, "not_found");
    };
    let limit = page.limit.unwrap_or(DEFAULT_PAGE).min(st.limits.max_page);
    match st.store.envelope(id, page.offset.unwrap_or(0), limit).await {
        Ok(Some(p)) => axum::Json(p).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "not_found"),
        Err(e) => store_error(e),
    }
}

async fn wallet<S: Store>(
    State(st): State<AppState<S>>,
    Path(user): Path<String>,
    Query(page): Query<PageQuery>,
) -> Response {
    let limit = page.limit.unwrap_or(20).min(st.limits.max_page);
    match st.store.wallet(&user, limit).await {
        Ok(w) => axum::Json(w).into_response(),
        Err(e) => store_error(e),
    }
}

async fn healthz<S: Store>(State(st): State<AppState<S>>) -> Response {
    let h = st.store.health();
    let status = if h.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(h)).into_response()
}

async fn stats<S: Store>(State(st): State<AppState<S>>) -> Response {
    match st.store.totals().await {
        Ok(t) => axum::Json(t).into_response(),
        Err(e) => store_error(e),
    }
}

fn error(status: StatusCode, code: &str) -> Response {
    (status, axum::Json(json!({ "error": code }))).into_response()
}

fn json_error(status: StatusCode, code: &str, reason: &str) -> Response {
    (
        status,
        axum::Json(json!({ "error": code, "reason": reason })),
    )
        .into_response()
}

fn invalid(reason: &str) -> Response {
    json_error(StatusCode::BAD_REQUEST, "invalid_request", reason)
}

fn store_error(e: StoreError) -> Response {
    let StoreError::Unavailable(why) = e;
    tracing::warn!(reason = %why, "answering 503");
    json_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &why)
}

//! The auth hook in front of every RPC: a bearer token, hashed and looked up in the catalog,
//! becomes a [`Principal`] in the request's extensions. Services read it with
//! [`principal`]; a request without one never reaches them.

use std::sync::Arc;

use hashgrid_proto::auth::{parse_bearer, TokenHash, METADATA_KEY};
use tonic::{Request, Status};

use crate::catalog::Principal;
use crate::context::NodeContext;
use crate::error::NodeError;

/// Builds the interceptor for one node.
pub fn interceptor(
    ctx: Arc<NodeContext>,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |mut req: Request<()>| {
        let token = req
            .metadata()
            .get(METADATA_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_bearer)
            .ok_or_else(|| {
                Status::unauthenticated(
                    "missing bearer token: pass --token, --token-file or HASHGRID_TOKEN",
                )
            })?;
        if !ctx.is_ready() {
            return Err(NodeError::NotReady.into());
        }
        let principal = ctx
            .catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .authenticate(&TokenHash::of(token))
            .ok_or_else(|| Status::unauthenticated("unknown token"))?;
        req.extensions_mut().insert(principal);
        Ok(req)
    }
}

/// The caller of an authenticated request.
pub fn principal<T>(req: &Request<T>) -> Result<Principal, Status> {
    req.extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("request did not pass the auth hook"))
}

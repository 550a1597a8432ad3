//! Writing [`PolicyReport`]s to the API server (kube-rs): one server-side
//! apply per report, `PATCH
//! /apis/wgpolicyk8s.io/v1alpha2/namespaces/NS/policyreports/NAME
//! ?fieldManager=portguard&force=true` with `Content-Type:
//! application/apply-patch+yaml` and the whole object as the body. Apply
//! creates the report or replaces what portguard wrote before (it owns
//! every field it sets; `force` takes them back from anyone who edited
//! them), in one request, without reading it first.
//!
//! Needs RBAC `patch` (and `create`, which apply of a missing object
//! checks) on `policyreports.wgpolicyk8s.io` in the namespaces reported
//! (deploy/kubernetes/rbac.yaml).

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
};

use super::{GROUP, KIND, PLURAL, PolicyReport, SOURCE, VERSION};

/// The API resource of [`PolicyReport`].
pub fn api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, KIND), PLURAL)
}

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// No cluster configuration (not in a pod, no kubeconfig).
    #[error("no Kubernetes API configuration (in-cluster or kubeconfig): {source}")]
    Config {
        #[source]
        source: kube::Error,
    },
    /// The API server refused or could not be reached.
    #[error("applying PolicyReport {namespace}/{name}: {source}")]
    Apply {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    /// The report could not be made JSON (does not happen).
    #[error("encoding PolicyReport {namespace}/{name}: {source}")]
    Encode {
        namespace: String,
        name: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Writes reports with one client.
#[derive(Clone)]
pub struct Publisher {
    client: Client,
}

impl Publisher {
    /// A publisher over the in-cluster configuration (the pod's service
    /// account), or the kubeconfig outside a cluster.
    pub async fn infer() -> Result<Self, ReportError> {
        let client = Client::try_default()
            .await
            .map_err(|source| ReportError::Config { source })?;
        Ok(Self { client })
    }

    /// A publisher over any client (tests give one over a mock service).
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// Create or replace one report (server-side apply, forced).
    pub async fn apply(&self, report: &PolicyReport) -> Result<(), ReportError> {
        let ns = &report.metadata.namespace;
        let name = &report.metadata.name;
        let body = serde_json::to_value(report).map_err(|source| ReportError::Encode {
            namespace: ns.clone(),
            name: name.clone(),
            source,
        })?;
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), ns, &api_resource());
        api.patch(
            name,
            &PatchParams::apply(SOURCE).force(),
            &Patch::Apply(body),
        )
        .await
        .map_err(|source| ReportError::Apply {
            namespace: ns.clone(),
            name: name.clone(),
            source,
        })?;
        Ok(())
    }

    /// Apply each report in turn; the errors, one per report that failed.
    pub async fn apply_all(&self, reports: &[PolicyReport]) -> Vec<ReportError> {
        let mut errors = Vec::new();
        for r in reports {
            if let Err(e) = self.apply(r).await {
                errors.push(e);
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::http::{Request, Response};
    use kube::client::Body;

    use super::*;
    use crate::report::{Decision, Tally};

    /// What the mock API server was sent.
    #[derive(Debug)]
    struct Seen {
        method: String,
        path_and_query: String,
        content_type: String,
        body: serde_json::Value,
    }

    /// A client over a tower service that records each request and answers
    /// `status` with the request's body (as an API server answers an
    /// apply with the object).
    fn mock(status: u16) -> (Client, Arc<Mutex<Vec<Seen>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let svc = tower::service_fn(move |req: Request<Body>| {
            let log = log.clone();
            async move {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await?;
                let value: serde_json::Value = serde_json::from_slice(&bytes)?;
                log.lock().unwrap().push(Seen {
                    method: parts.method.to_string(),
                    path_and_query: parts.uri.path_and_query().unwrap().to_string(),
                    content_type: parts.headers["content-type"].to_str()?.to_owned(),
                    body: value,
                });
                let answer = if status == 200 {
                    bytes.to_vec()
                } else {
                    serde_json::to_vec(&serde_json::json!({
                        "kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "message": "policyreports.wgpolicyk8s.io is forbidden",
                        "reason": "Forbidden", "code": status}))?
                };
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(Body::from(answer))?,
                )
            }
        });
        (Client::new(svc, "default"), seen)
    }

    fn report() -> PolicyReport {
        let mut t = Tally::default();
        t.add(
            Decision::of_json(&serde_json::json!({
                "verdict": "deny", "host": "node1", "policy": "web", "rule": "bind",
                "k8s_namespace": "payments", "k8s_pod": "web-0", "k8s_pod_uid": "u-1",
                "container_name": "server", "protocol": "tcp", "port": 8081, "count": 2,
                "time": "2026-11-22T01:00:00Z"}))
            .unwrap(),
        );
        t.reports(("2026-11-22T00:55:00Z", "2026-11-22T01:00:00Z"))
            .remove(0)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_report_is_written_with_one_forced_server_side_apply() {
        let (client, seen) = mock(200);
        let r = report();
        Publisher::new(client).apply(&r).await.unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
        let s = &seen[0];
        assert_eq!(s.method, "PATCH");
        assert_eq!(
            s.path_and_query,
            "/apis/wgpolicyk8s.io/v1alpha2/namespaces/payments/policyreports/portguard-node1?&force=true&fieldManager=portguard"
        );
        assert_eq!(s.content_type, "application/apply-patch+yaml");
        // The body is the whole object, as rendered.
        assert_eq!(s.body, serde_json::to_value(&r).unwrap());
        assert_eq!(s.body["apiVersion"], "wgpolicyk8s.io/v1alpha2");
        assert_eq!(s.body["kind"], "PolicyReport");
        assert_eq!(s.body["metadata"]["namespace"], "payments");
        assert_eq!(s.body["results"][0]["result"], "fail");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_refused_apply_names_the_report_and_the_others_are_still_written() {
        let (client, seen) = mock(403);
        let mut other = report();
        other.metadata.namespace = "shop".into();
        let errors = Publisher::new(client).apply_all(&[report(), other]).await;
        assert_eq!(seen.lock().unwrap().len(), 2);
        assert_eq!(errors.len(), 2);
        let text = errors[0].to_string();
        assert!(
            text.contains("payments/portguard-node1") && text.contains("forbidden"),
            "{text}"
        );
        assert!(errors[1].to_string().contains("shop/portguard-node1"));
    }
}

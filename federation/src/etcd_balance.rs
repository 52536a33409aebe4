//! The etcd client's channel: requests balanced over the members by fewest requests pending.
//!
//! etcd-client balances with tonic's `Channel::balance_channel`, a power-of-two-choices
//! balancer whose members all report a load of 0: each request goes to a member drawn at
//! random, whatever that member did with the last ones. A member that holds requests and
//! answers nothing (stopped, or resumed and still following a leader that is gone) then gets
//! a third of them, and a request sent again because the first copy was held
//! ([`crate::etcd`]'s hedging) lands on the same member a third of the time. Here each member
//! reports the requests it has pending (`tower::load::PendingRequests`, counted until the
//! response's headers), so of two members drawn the one with fewer pending is chosen: a
//! held request steers the next ones, its own copies first, to the members that answer. The
//! rest is what tonic builds: one lazily connected channel per member endpoint (etcd-client
//! sets TLS and keep-alive on the endpoint), added and removed as etcd-client says.

use std::convert::Infallible;

use etcd_client::{BalancedChannelBuilder, Channel};
use futures::StreamExt;
use http::Uri;
use tokio::sync::mpsc;
use tonic::transport::Endpoint;
use tonic::transport::channel::Change;
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::discover::Change as Discovered;
use tower::load::{CompleteOnResponse, PendingRequests};
use tower::util::BoxCloneSyncService;

/// Builds the channel (see the module docs).
pub(crate) struct LeastPending;

impl BalancedChannelBuilder for LeastPending {
    type Error = etcd_client::Error;

    fn balanced_channel(
        self,
        buffer_size: usize,
    ) -> Result<(Channel, mpsc::Sender<Change<Uri, Endpoint>>), Self::Error> {
        let (tx, rx) = mpsc::channel::<Change<Uri, Endpoint>>(buffer_size);
        let members = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|change| (change, rx))
        })
        .map(|change| {
            Ok::<_, Infallible>(match change {
                Change::Insert(uri, endpoint) => Discovered::Insert(
                    uri,
                    PendingRequests::new(endpoint.connect_lazy(), CompleteOnResponse::default()),
                ),
                Change::Remove(uri) => Discovered::Remove(uri),
            })
        });
        let balance = Balance::new(Box::pin(members));
        let channel = Buffer::new(balance, buffer_size);
        Ok((Channel::Custom(BoxCloneSyncService::new(channel)), tx))
    }
}

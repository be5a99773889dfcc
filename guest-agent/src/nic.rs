//! The guest's NICs over netlink (rtnetlink): an address, the link up and a
//! default route for `configure`, and everything off again for a reset, in
//! a few messages instead of a fork of `ip` each (what that saved:
//! docs/BENCHMARKS.md, Networking).

use std::net::{IpAddr, Ipv4Addr};

use futures_util::stream::TryStreamExt as _;
use rtnetlink::{new_connection, Handle, LinkUnspec, RouteMessageBuilder};

fn err(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

async fn handle() -> Result<Handle, String> {
    let (conn, handle, _) = new_connection().map_err(|e| err("opening netlink", e))?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn index_of(h: &Handle, name: &str) -> Result<u32, String> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(l.header.index),
        Ok(None) => Err(format!("no interface {name}")),
        Err(e) => Err(err(&format!("finding {name}"), e)),
    }
}

async fn flush_addresses(h: &Handle, index: u32) -> Result<(), String> {
    let mut addrs = h.address().get().set_link_index_filter(index).execute();
    let mut found = Vec::new();
    while let Some(a) = addrs.try_next().await.map_err(|e| err("listing addresses", e))? {
        found.push(a);
    }
    for a in found {
        h.address().del(a).execute().await.map_err(|e| err("removing an address", e))?;
    }
    Ok(())
}

/// `name` up with only `addr/prefix`, and the default route via `gateway`.
pub async fn configure(name: &str, addr: IpAddr, prefix: u8, gateway: Option<IpAddr>) -> Result<(), String> {
    let h = handle().await?;
    let index = index_of(&h, name).await?;
    flush_addresses(&h, index).await?;
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| err(&format!("bringing {name} up"), e))?;
    h.address()
        .add(index, addr, prefix)
        .execute()
        .await
        .map_err(|e| err(&format!("adding {addr}/{prefix}"), e))?;
    if let Some(IpAddr::V4(gw)) = gateway {
        let route = RouteMessageBuilder::<Ipv4Addr>::new().output_interface(index).gateway(gw).build();
        h.route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(|e| err(&format!("default route via {gw}"), e))?;
    }
    Ok(())
}

/// Every interface but `lo` without addresses and down (its routes go with
/// the link).
pub async fn clear(names: &[String]) -> Result<(), String> {
    let h = handle().await?;
    for name in names {
        let index = index_of(&h, name).await?;
        flush_addresses(&h, index).await?;
        h.link()
            .set(LinkUnspec::new_with_index(index).down().build())
            .execute()
            .await
            .map_err(|e| err(&format!("taking {name} down"), e))?;
    }
    Ok(())
}

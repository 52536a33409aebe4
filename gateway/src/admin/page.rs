//! The status page: one self-contained HTML document (`page.html`: inline CSS and JS) that
//! draws the federation from `/status` and fetches it again every second, so it updates
//! without a reload.
//!
//! It needs no network: nothing is loaded from a CDN or any other host (admin pages must work
//! air-gapped), and [`CONTENT_SECURITY_POLICY`] makes the browser hold it to that. The
//! document itself is static; every name it shows comes from `/status` and is written as a
//! DOM text node, never parsed as HTML, since names come from the catalog, that is from peers.

/// The page, served at `/`.
pub const HTML: &str = include_str!("page.html");

/// What the page may do: run its own inline script and style, fetch from this server (only
/// `/status`), show `data:` images (its empty favicon). Nothing from anywhere else.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        // The one URL in it is the SVG namespace, an identifier that is never fetched.
        let urls: Vec<&str> = HTML
            .match_indices("http")
            .map(|(i, _)| HTML[i..].split('"').next().unwrap_or_default())
            .collect();
        assert_eq!(urls, ["http://www.w3.org/2000/svg"]);
        for attr in ["src=", "href=\"http", "@import", "url("] {
            assert!(!HTML.contains(attr), "the page references {attr}");
        }
        assert!(HTML.contains("fetch(\"/status\""));
    }

    #[test]
    fn names_are_never_parsed_as_html() {
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
        ] {
            assert!(!HTML.contains(sink), "the page uses {sink}");
        }
    }
}

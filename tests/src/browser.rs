//! A real headless Chromium, driven over the DevTools protocol (chromiumoxide), for the pages
//! a gateway serves.
//!
//! Everything that goes wrong in a page during the whole session is collected: console
//! `error` and `assert` calls, uncaught exceptions, and the browser's own error log entries
//! (failed loads, refused content-security-policy requests). A test closes the browser and
//! fails on any of [`Browser::errors`].
//!
//! Chromium must be where Debian's `chromium` package puts it ([`CHROMIUM`], installed by
//! `.ci/setup test`): a missing browser fails the test, it is never skipped.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use chromiumoxide::cdp::browser_protocol::log::{EventEntryAdded, LogEntryLevel};
use chromiumoxide::cdp::js_protocol::runtime::{
    ConsoleApiCalledType, EventConsoleApiCalled, EventExceptionThrown,
};
use chromiumoxide::handler::viewport::Viewport;
use chromiumoxide::{BrowserConfig, Page};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;

/// Where Debian's `chromium` package installs the browser.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// How long Chromium may take to start and answer on its DevTools socket.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one DevTools command may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// A headless Chromium and the errors its pages reported so far.
#[derive(Debug)]
pub struct Browser {
    browser: chromiumoxide::Browser,
    handler: JoinHandle<()>,
    listeners: Vec<JoinHandle<()>>,
    errors: Arc<Mutex<Vec<String>>>,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium headless (`--no-sandbox`: CI runs as root) with a fresh profile and a
    /// `width`×`height` viewport.
    pub async fn launch(width: u32, height: u32) -> anyhow::Result<Self> {
        if !Path::new(CHROMIUM).exists() {
            bail!(
                "{CHROMIUM} is missing: the status page test needs a real browser (install the test packages: bash .ci/setup test)"
            );
        }
        let profile = tempfile::tempdir().context("browser profile dir")?;
        let config = BrowserConfig::builder()
            .chrome_executable(CHROMIUM)
            .new_headless_mode()
            .no_sandbox()
            .user_data_dir(profile.path())
            .window_size(width, height)
            .viewport(Viewport {
                width,
                height,
                device_scale_factor: Some(1.0),
                ..Viewport::default()
            })
            .launch_timeout(LAUNCH_TIMEOUT)
            .request_timeout(REQUEST_TIMEOUT)
            // Nothing a page should need: no first-run or background network chatter.
            .args([
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
            ])
            .build()
            .map_err(anyhow::Error::msg)?;
        let (browser, mut handler) = chromiumoxide::Browser::launch(config)
            .await
            .context("launch chromium")?;
        let handler = tokio::spawn(async move {
            while let Some(event) = handler.next().await {
                if event.is_err() {
                    // A message the driver could not read; the session goes on.
                    continue;
                }
            }
        });
        Ok(Self {
            browser,
            handler,
            listeners: Vec::new(),
            errors: Arc::default(),
            _profile: profile,
        })
    }

    /// Opens `url` in a new tab, listening for its errors from before the first byte loads.
    pub async fn open(&mut self, url: &str) -> anyhow::Result<Page> {
        let page = self
            .browser
            .new_page("about:blank")
            .await
            .context("new tab")?;
        let mut console = page.event_listener::<EventConsoleApiCalled>().await?;
        let errors = self.errors.clone();
        self.listeners.push(tokio::spawn(async move {
            while let Some(e) = console.next().await {
                if matches!(
                    e.r#type,
                    ConsoleApiCalledType::Error | ConsoleApiCalledType::Assert
                ) {
                    let args: Vec<String> = e
                        .args
                        .iter()
                        .map(|a| {
                            a.value
                                .as_ref()
                                .map(ToString::to_string)
                                .or_else(|| a.description.clone())
                                .unwrap_or_default()
                        })
                        .collect();
                    push(
                        &errors,
                        format!("console.{:?}: {}", e.r#type, args.join(" ")),
                    );
                }
            }
        }));
        let mut exceptions = page.event_listener::<EventExceptionThrown>().await?;
        let errors = self.errors.clone();
        self.listeners.push(tokio::spawn(async move {
            while let Some(e) = exceptions.next().await {
                let d = &e.exception_details;
                let what = d
                    .exception
                    .as_ref()
                    .and_then(|x| x.description.clone())
                    .unwrap_or_else(|| d.text.clone());
                push(
                    &errors,
                    format!(
                        "uncaught exception at {}:{}: {what}",
                        d.line_number, d.column_number
                    ),
                );
            }
        }));
        let mut log = page.event_listener::<EventEntryAdded>().await?;
        let errors = self.errors.clone();
        self.listeners.push(tokio::spawn(async move {
            while let Some(e) = log.next().await {
                if e.entry.level == LogEntryLevel::Error {
                    push(
                        &errors,
                        format!(
                            "browser log ({:?}): {} {}",
                            e.entry.source,
                            e.entry.text,
                            e.entry.url.as_deref().unwrap_or("")
                        ),
                    );
                }
            }
        }));
        page.enable_runtime().await?;
        page.enable_log().await?;
        page.goto(url)
            .await
            .with_context(|| format!("open {url}"))?;
        Ok(page)
    }

    /// Every error reported so far.
    pub fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Closes the browser and waits for its process.
    pub async fn close(mut self) {
        let _ = self.browser.close().await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.browser.wait()).await;
        for l in self.listeners.drain(..) {
            l.abort();
        }
        self.handler.abort();
    }
}

fn push(errors: &Mutex<Vec<String>>, error: String) {
    errors.lock().unwrap_or_else(|e| e.into_inner()).push(error);
}

/// Evaluates the JavaScript expression `js` in `page` and decodes its value.
pub async fn eval<T: DeserializeOwned>(page: &Page, js: &str) -> anyhow::Result<T> {
    page.evaluate(js)
        .await
        .with_context(|| format!("evaluate {js}"))?
        .into_value()
        .with_context(|| format!("decode the value of {js}"))
}

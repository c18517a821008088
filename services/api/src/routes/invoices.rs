//! Issued invoices and credit notes, listed and fetched (JSON, CSV, PDF).

use super::*;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Items per page (1 to `max_page`, default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// An issued invoice, without its lines.
#[derive(Debug, Serialize, ToSchema)]
pub struct InvoiceSummary {
    pub issuer: String,
    pub number: u64,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub currency: String,
    #[schema(value_type = String)]
    pub total: Decimal,
    pub issued_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InvoiceList {
    /// Newest first.
    pub invoices: Vec<InvoiceSummary>,
    pub next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/customers/{customer}/credit-notes", tag = "invoices",
    summary = "Credit notes on the customer's invoices, oldest first",
    description = "Each note credits amounts of one issued invoice (which never changes) and says where its total went: `next_invoice` (the credit balance, applied by the next invoice's `balance.applied` line) or `wallet` (a deposit).",
    params(Tenant),
    responses((status = 200, body = Vec<idlemeter_store::CreditNote>),
        QueryProblems))]
pub async fn credit_notes(
    State(state): AppStateRef,
    Tenant(customer): Tenant,
) -> ApiResult<axum::Json<Vec<idlemeter_store::CreditNote>>> {
    let headers = state
        .store
        .credit_notes_of(&state.billing.terms.issuer, customer.as_str())
        .await?;
    let mut notes = Vec::with_capacity(headers.len());
    for header in &headers {
        let lines = state.store.credit_note_lines(header).await?;
        notes.push(idlemeter_store::CreditNote::from_rows(header, &lines)?);
    }
    Ok(axum::Json(notes))
}

#[utoipa::path(get, path = "/v1/customers/{customer}/invoices", tag = "invoices",
    summary = "Issued invoices, newest first",
    params(Tenant, PageQuery),
    responses((status = 200, body = InvoiceList),
        QueryProblems))]
pub async fn invoices(
    State(state): AppStateRef,
    Tenant(customer): Tenant,
    Query(query): Query<PageQuery>,
) -> ApiResult<axum::Json<InvoiceList>> {
    let limit = page_limit(&state, query.limit)?;
    let before = match decode_cursor('n', query.cursor.as_deref())? {
        Some(number) => number
            .parse::<u64>()
            .map_err(|_| Problem::bad_request("cursor is not one this endpoint returned"))?,
        None => u64::MAX,
    };
    let mut rows = state
        .store
        .invoices_of(
            &state.billing.terms.issuer,
            customer.as_str(),
            before,
            limit + 1,
        )
        .await?;
    let next_cursor = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last()
            .map(|last| encode_cursor('n', &last.number.to_string()))
    } else {
        None
    };
    let invoices = rows
        .iter()
        .map(|row| {
            Ok(InvoiceSummary {
                issuer: row.issuer.clone(),
                number: row.number,
                period_start: time(row.period_start),
                period_end: time(row.period_end),
                currency: row.currency.clone(),
                total: from_column(row.total)?.normalize(),
                issued_at: time(row.issued_at),
            })
        })
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(axum::Json(InvoiceList {
        invoices,
        next_cursor,
    }))
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InvoiceFormat {
    Json,
    Csv,
    Pdf,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct InvoiceQuery {
    /// `json` (default), `csv` or `pdf`; `Accept: text/csv` or
    /// `application/pdf` also selects it.
    pub format: Option<InvoiceFormat>,
}

#[utoipa::path(get, path = "/v1/customers/{customer}/invoices/{number}", tag = "invoices",
    summary = "One issued invoice, as JSON, CSV or PDF",
    params(Tenant,
        ("number" = u64, Path, description = "Invoice number"), InvoiceQuery),
    responses((status = 200, description = "The invoice", content((Invoice = "application/json"), (String = "text/csv"), (Vec<u8> = "application/pdf"))),
        QueryProblems))]
pub async fn invoice(
    State(state): AppStateRef,
    Tenant(customer): Tenant,
    Path((_, number)): Path<(String, u64)>,
    Query(query): Query<InvoiceQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let not_found = || Problem::not_found("invoice", &number.to_string());
    let header = state
        .store
        .invoice_of(&state.billing.terms.issuer, customer.as_str(), number)
        .await?
        .ok_or_else(not_found)?;
    let lines = state.store.invoice_lines(&header).await?;
    let invoice = Invoice::from_rows(&header, &lines).map_err(Problem::internal)?;
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let format = query.format.unwrap_or(if accept.contains("text/csv") {
        InvoiceFormat::Csv
    } else if accept.contains("application/pdf") {
        InvoiceFormat::Pdf
    } else {
        InvoiceFormat::Json
    });
    if format == InvoiceFormat::Pdf {
        let parties = idlemeter_store::pdf::Parties::of(&invoice, &state.billing.terms.seller);
        return Ok((
            [(header::CONTENT_TYPE, "application/pdf")],
            idlemeter_store::pdf::to_pdf(&invoice, &parties),
        )
            .into_response());
    }
    if format == InvoiceFormat::Csv {
        Ok((
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            idlemeter_store::document::to_csv(&invoice),
        )
            .into_response())
    } else {
        Ok(axum::Json(invoice.normalized()).into_response())
    }
}
